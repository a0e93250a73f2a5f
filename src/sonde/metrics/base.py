"""The Metric extension point: declared mergeable state, ``update`` and ``compute``.

A metric is updated on the training thread with a :class:`Capture` and must stay on the
tensor's device there: it *stages* small partial states with :meth:`Metric.stage` instead of
reading values. At the end of a recorded step the probe moves every staged tensor of every
metric to the host in one batched transfer, folds each partial into the metric's host state
with the state's declared ``reduce``, and calls :meth:`Metric.compute`.

Declared state is what makes merging free: ``merge(other)`` folds another instance's state in
with the same reduce functions, for several batches, processes or ranks alike.

Example:
    >>> import numpy as np, torch
    >>> class Peak(Metric):
    ...     name = "peak"
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.add_state("peak", default=-np.inf, reduce="max")
    ...     def update(self, capture):
    ...         self.stage("peak", capture.tensor.detach().max())
    ...     def compute(self):
    ...         return {"peak": float(self.state["peak"])}
    >>> m = Peak()
    >>> m.update(Capture(torch.tensor([1.0, 5.0])))
    >>> m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    >>> m.compute()
    {'peak': 5.0}
"""

from __future__ import annotations

import copy
import numbers
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sonde import functional as F
from sonde.errors import ConfigError
from sonde.functional import native
from sonde.records import Record
from sonde.schedules import Schedule, as_schedule

__all__ = ["RESET_POLICIES", "Capture", "Metric", "Reduce"]

Reduce = Callable[[Any, Any], Any]

#: When a metric's state is cleared: after each compute, at ``probe.end_epoch()``, or never.
RESET_POLICIES = ("compute", "epoch", "never")

_REDUCERS: dict[str, Reduce] = {
    "sum": lambda a, b: a + b,
    "max": np.maximum,
    "min": np.minimum,
    "cat": lambda a, b: np.concatenate([a, b]),
}


_IMMUTABLE = (type(None), int, float, str, tuple)


class Capture:
    """A tensor seen by a probe, with what the metrics need to know about it.

    ``cached(key, fn)`` computes ``fn(tensor)`` once per tensor version for all metrics of a
    step (the activations of one layer are often the inputs of the next: same tensor, one
    reduction). The capture holds the tensor only while metrics update. ``layer_type`` is the
    layer's class name (``Linear``, ``Conv2d``, ``LSTM``), for metrics whose reading of a
    tensor's axes depends on it.

    The tensor statistics share one fused pass: :meth:`summary` gives the raw partials of
    :func:`sonde.functional.summarize_raw`, and :meth:`histogram` counts over fixed edges;
    metrics announce the histograms they will ask for in :meth:`Metric.prepare` (through
    :meth:`want_histogram`) so that the first of them computes everything in one read.
    A capture may describe a difference ``tensor - minus`` (a parameter's update): the fused
    pass reads both without materialising it, and :attr:`tensor` materialises it (into
    ``minus``'s memory; in float32 for half-precision operands, whose exact difference needs
    more bits than they have) only when a metric reads it. ``copy_to`` asks for a copy of the tensor
    (a parameter's snapshot before the optimizer step), made during the fused pass or by
    :meth:`finish`.
    """

    __slots__ = ("_local", "_memo", "_minus", "_tensor", "_wanted", "copied", "copy_to", "labels", "layer",
                 "layer_type", "phase", "step", "topic")

    def __init__(
        self,
        tensor: torch.Tensor,
        *,
        layer: str = "",
        topic: str = "",
        phase: str = "train",
        step: int = 0,
        labels: torch.Tensor | None = None,
        memo: TensorMemo | None = None,
        layer_type: str = "",
        minus: torch.Tensor | None = None,
        copy_to: torch.Tensor | None = None,
    ) -> None:
        self._tensor = tensor
        self._minus = minus
        self.copy_to = copy_to
        self.copied = False
        self.layer = layer
        self.layer_type = layer_type
        self.topic = topic
        self.phase = phase
        self.step = step
        self.labels = labels
        # A difference is this capture's alone; a plain tensor's reductions are shared through the memo.
        self._memo = memo if minus is None else None
        self._local: dict[str, Any] = {}
        self._wanted: list[tuple[float, float, int]] = []

    @property
    def tensor(self) -> torch.Tensor:
        if self._minus is not None:
            with torch.no_grad():
                after = self._tensor.detach()
                if after.dtype in (torch.float16, torch.bfloat16):
                    # The difference of two half-precision numbers needs more bits than they have.
                    self._tensor = after.float() - self._minus.float()
                else:
                    self._tensor = torch.sub(after, self._minus, out=self._minus)
            self._minus = None
        return self._tensor

    def numel(self) -> int:
        """Number of elements, without materialising a difference."""
        return self._tensor.numel()

    def cached(self, key: str, fn: Callable[[torch.Tensor], Any]) -> Any:
        if self._memo is None:
            if key not in self._local:
                self._local[key] = fn(self.tensor)
            return self._local[key]
        return self._memo.get(self.tensor, key, fn)

    def want_histogram(self, lo: float, hi: float, bins: int) -> None:
        """Announce (from :meth:`Metric.prepare`) that :meth:`histogram` will be asked for these edges."""
        self._wanted.append((lo, hi, bins))

    def summary(self) -> Any:
        """Raw summary partials (:func:`sonde.functional.summarize_raw`), computed once."""
        raw = self._lookup("summary")
        if raw is None:
            raw = self._compute(self._wanted[0] if self._wanted else None)[0]
        return raw

    def histogram(self, lo: Any, hi: Any, bins: int) -> Any:
        """Counts of ``bins`` equal-width bins over ``[lo, hi]`` (see :func:`sonde.functional.histogram_counts`)."""
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):  # device-side edges: no fusing
            return F.histogram_counts(self.tensor, lo, hi, bins, nan_free=_nan_free(self.summary()))
        spec = (float(lo), float(hi), bins)
        counts = self._lookup(_histogram_key(spec))
        if counts is None:
            counts = self._compute(spec)[1]
        return counts

    def _compute(self, spec: tuple[float, float, int] | None) -> tuple[Any, Any]:
        """The summary and the counts of histogram ``spec``, in one pass where the kernel allows."""
        known = self._lookup("summary")
        copy_to = None if self.copied else self.copy_to
        source = self._tensor if self._minus is not None else self.tensor
        fused = spec if spec is None or spec[2] <= native.MAX_BINS else None  # more bins: torch counts them
        fast = native.summarize(source, minus=self._minus, copy_to=copy_to, histogram=fused)
        raw: Any
        counts: Any
        if fast is not None:
            raw, counts = fast
            self.copied = self.copied or copy_to is not None
            if spec is not None and fused is None:
                counts = F.histogram_counts(self.tensor, *spec, nan_free=_nan_free(raw))
        else:  # torch reductions: on accelerators, and on the CPU without the compiled kernel
            self.finish()
            raw = known if known is not None else F.summarize_raw(self.tensor)
            counts = None
            if spec is not None:
                counts = F.histogram_counts(self.tensor, *spec, nan_free=_nan_free(raw))
        if known is None:
            self._store("summary", raw)
        if spec is not None:
            self._store(_histogram_key(spec), counts)
        return raw, counts

    def _lookup(self, key: Any) -> Any:
        if self._memo is None:
            return self._local.get(key)
        return self._memo.peek(self.tensor, key)

    def _store(self, key: Any, value: Any) -> None:
        if self._memo is None:
            self._local[key] = value
        else:
            self._memo.put(self.tensor, key, value)

    @staticmethod
    def provide(memo: TensorMemo, tensor: torch.Tensor, summary: Any,
                histograms: dict[tuple[float, float, int], Any]) -> None:
        """Partials of ``tensor`` computed elsewhere, for the captures of ``tensor`` sharing ``memo``
        (the bus's, until its flush): :meth:`summary` returns ``summary`` (the raw partials of
        :func:`sonde.functional.summarize_raw`, as a host vector) and :meth:`histogram` the counts
        given for ``(lo, hi, bins)``, without reading the tensor. ``sonde.jax`` reduces inside the
        user's jitted step and hands the metrics only these numbers."""
        memo.put(tensor, "summary", summary)
        for spec, counts in histograms.items():
            memo.put(tensor, _histogram_key(spec), counts)

    def finish(self) -> None:
        """Make the copy ``copy_to`` asked for, if the fused pass did not."""
        if self.copy_to is not None and not self.copied:
            with torch.no_grad():
                self.copy_to.copy_(self.tensor.detach())
            self.copied = True


def _nan_free(raw: Any) -> bool:
    """Whether raw summary partials say there is no NaN, known without a device sync (on the CPU
    the count is a host number; on accelerators it is a device tensor, and the answer is no).
    An empty tensor's partials are ``(0.0,)``: nothing in it, so no NaN either."""
    if len(raw) == 1:
        return True
    return isinstance(raw[8], float) and raw[8] == 0


def _histogram_key(spec: tuple[float, float, int]) -> tuple[str, float, float, int]:
    return ("histogram", *spec)


class TensorMemo:
    """Per-step memo of reductions keyed by tensor identity and version, holding no tensor alive."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int, Any], tuple[Any, Any]] = {}

    def get(self, tensor: torch.Tensor, key: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
        value = self.peek(tensor, key)
        if value is None:
            value = fn(tensor)
            self.put(tensor, key, value)
        return value

    def peek(self, tensor: torch.Tensor, key: Any) -> Any:
        """The value memoised for this tensor version, or None."""
        entry = self._entries.get((id(tensor), tensor._version, key))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def put(self, tensor: torch.Tensor, key: Any, value: Any) -> None:
        self._entries[(id(tensor), tensor._version, key)] = (weakref.ref(tensor), value)

    def clear(self) -> None:
        self._entries.clear()


class Metric:
    """Base class of all metrics.

    Class attributes:
        name: the registry name users pass in ``metrics=[...]``.
        outputs: the metric names this class emits in Records (default: ``(name,)``).
        topics: the topics it applies to when selected by name.
        requires: other metric names it needs on the same layer (pulled in automatically).
        reads_topics: for a metric of Records, the other topic each of its topics reads
            (``update_ratio`` on ``weight_updates`` reads ``weights``): the required metrics
            are subscribed to those topics too.

        offload: when True, :meth:`compute` runs on the probe's background worker, on a snapshot
            of the host state, and its Records reach the sinks when it is done (they carry the
            step they were computed for). The training thread only runs the cheap ``update``.
            An offloaded ``compute`` must read only ``self.state`` and configuration: it runs on a
            shallow copy, so attributes it sets are not kept.
        derived: a metric of Records: it captures nothing and, at each flush, :meth:`derive` computes
            its value from the values the step's other metrics computed (its ``requires``), on the
            same layer (``update_ratio`` from two ``norm`` values).
        watches: a watcher of Records: one instance (never cloned per layer) reads every Record
            the run emits through :meth:`watch` and adds Records of its own (``alerts``).
        probe_set: ``"required"`` when the metric compares activations on a fixed probe set
            (``sonde.probe(..., probe_set=...)``), ``"optional"`` when it uses one if given (task
            scores, with labels), None (default) when it reads the training captures.
        uses_step_labels: the probe hands the metric, as ``step_labels``, the labels logged in the
            current train step (``p.log(labels=y)``), so that it can pair them with activations.
        bounds: the inclusive ``(low, high)`` range of each numeric setting (``{"bins": (1, 4096)}``;
            int bounds ask for an integer). :meth:`check_settings` holds the constructor's
            arguments and every metric spec that reaches the server to them: one rule for the
            Python API and the network, so no setting can make a metric's state or its Records huge.

    Args:
        every: an int or a schedule ``step -> bool`` overriding the probe's ``every=``: when
            ``update`` runs.
        compute_every: an int or a schedule ``step -> bool``: state accumulates across recorded
            steps and ``compute`` runs (Records are emitted) only at the steps it accepts. None
            (default): at every step the metric was updated. Whatever it says, state that was
            never computed is computed at the probe's last step, so nothing recorded is lost.
        reset: when the state is cleared: ``"compute"`` (after each compute, so the value at step
            k covers exactly the batches recorded since the previous value, step k included),
            ``"epoch"`` (when the user calls ``probe.end_epoch()``; the last step of the epoch
            then computes whatever ``compute_every`` says) or ``"never"``.
    """

    name: ClassVar[str] = ""
    outputs: ClassVar[tuple[str, ...]] = ()
    topics: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    reads_topics: ClassVar[dict[str, str]] = {}
    offload: ClassVar[bool] = False
    derived: ClassVar[bool] = False
    watches: ClassVar[bool] = False
    probe_set: ClassVar[str | None] = None
    uses_step_labels: ClassVar[bool] = False
    bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    def __init__(
        self,
        *,
        every: int | Schedule | None = None,
        compute_every: int | Schedule | None = None,
        reset: str = "compute",
    ) -> None:
        if reset not in RESET_POLICIES:
            raise ConfigError(f"reset= expects one of {', '.join(map(repr, RESET_POLICIES))}, got {reset!r}")
        self.schedule: Schedule | None = None if every is None else as_schedule(every)
        self.compute_schedule: Schedule | None = None if compute_every is None else as_schedule(compute_every)
        self.reset_policy = reset
        self._defaults: dict[str, tuple[Any, Reduce]] = {}
        self.state: dict[str, Any] = {}
        self.staged: list[tuple[str, Any]] = []
        self.updates = 0

    @classmethod
    def check_settings(cls, **settings: Any) -> None:
        """Raise :class:`~sonde.errors.ConfigError` (a ValueError) for a setting outside :attr:`bounds`.

        Settings without a declared bound, and None (a default such as "all rows"), are left to
        the constructor. The message names the setting and its bound.

        Example:
            >>> from sonde.metrics import Histogram
            >>> Histogram.check_settings(bins=10_000_000)
            Traceback (most recent call last):
            ...
            sonde.errors.ConfigError: Histogram(bins=) expects an integer from 1 to 4096; got 10000000
        """
        for name, value in settings.items():
            bound = cls.bounds.get(name)
            if bound is None or value is None:
                continue
            low, high = bound
            integral = isinstance(low, int) and isinstance(high, int)
            kind = numbers.Integral if integral else numbers.Real
            number: Any = value  # compared exactly (no float() overflow for a huge int); NaN fails
            if isinstance(value, bool) or not isinstance(value, kind) or not low <= number <= high:
                raise ConfigError(f"{cls.__name__}({name}=) expects {'an integer' if integral else 'a number'} "
                                  f"from {low!r} to {high!r}; got {value!r:.80}")

    # -- declared state -------------------------------------------------------------------
    def add_state(self, name: str, default: Any, reduce: str | Reduce = "sum") -> None:
        """Declare a piece of mergeable host state with its reduce (sum, max, min, cat or a function)."""
        if isinstance(reduce, str):
            if reduce not in _REDUCERS:
                raise ConfigError(f"reduce= expects one of {sorted(_REDUCERS)} or a function, got {reduce!r}")
            reduce = _REDUCERS[reduce]
        self._defaults[name] = (default, reduce)
        self.state[name] = copy.deepcopy(default)

    def stage(self, name: str, value: torch.Tensor | np.ndarray | tuple[torch.Tensor | float, ...]) -> None:
        """Queue a partial for state ``name`` (a device tensor, a host numpy array, or a tuple of 0-d
        tensors and floats read back as one vector); it is folded in after the step's batched transfer."""
        self.staged.append((name, value))

    def absorb(self, name: str, value: Any) -> None:
        """Fold a host-side partial into state ``name`` with its declared reduce."""
        if value is None:
            return  # an empty partial (a never-updated instance being merged)
        _, reduce = self._defaults[name]
        current = self.state[name]
        self.state[name] = value if current is None else reduce(current, value)

    def absorb_staged(self, host: dict[int, np.ndarray]) -> None:
        """Fold in every staged partial, given their host copies keyed by ``id`` of the staged tensor."""
        for name, tensor in self.staged:
            value = host[id(tensor)]
            self.absorb(name, value if value.ndim else value.item())
        self.staged.clear()

    def shared_state(self) -> dict[str, Any]:
        """The state as other processes add it to theirs with each state's reduce (the merge across
        ranks): by default the state itself; a metric whose state depends on something of its
        own (saturation's shift) re-expresses it on a footing every process shares."""
        return self.state

    def merge(self, other: Metric) -> None:
        """Fold another instance's state into this one (other batches, processes or ranks)."""
        for name, value in other.state.items():
            self.absorb(name, value)
        self.updates += other.updates

    def reset(self) -> None:
        for name, (default, _) in self._defaults.items():
            self.state[name] = default if isinstance(default, _IMMUTABLE) else copy.deepcopy(default)
        self.staged.clear()
        self.updates = 0

    def due(self, step: int) -> bool:
        """Whether ``compute`` runs at ``step`` (``compute_every``; always when it is None)."""
        return self.compute_schedule is None or bool(self.compute_schedule(step))

    def snapshot(self) -> Metric:
        """A shallow copy owning a copy of the host state, for computing off the training thread.

        With ``reset="compute"`` the state is handed over (the caller resets this instance next);
        otherwise it is deep-copied, since this instance keeps accumulating into it.
        """
        snap = copy.copy(self)
        snap.state = dict(self.state) if self.reset_policy == "compute" else copy.deepcopy(self.state)
        snap.staged = []
        return snap

    # -- to override --------------------------------------------------------------------------
    def prepare(self, capture: Capture) -> None:
        """Before any metric updates from ``capture``: announce shared work (a histogram's edges)."""

    def update(self, capture: Capture) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        """Return ``{metric name: float or 1-D numpy array}`` from the host state."""
        raise NotImplementedError

    def derive(self, values: dict[tuple[str, str, str], Any], layer: str, topic: str) -> dict[str, Any]:
        """For a ``derived`` metric: its values at ``layer``/``topic`` from the step's computed
        ``values`` (keyed ``(layer, topic, metric name)``); empty when its inputs are missing."""
        return {}

    def watch(self, records: Sequence[Record]) -> list[Record]:
        """For a watcher (``watches``): the Records it adds after reading ``records`` (one batch,
        in the order they were computed)."""
        return []

    def boundary(self, kind: str) -> None:
        """The run reached the end of an epoch (``"epoch"``, after that step's flush) or ended
        (``"run"``, after the last flush). Called once per configured metric, not per instance:
        for metrics whose state lives elsewhere (:class:`~sonde.metrics.ServerMetric`)."""

    def emits(self) -> tuple[str, ...]:
        return self.outputs or (self.name,)

    def combine(self, other: Metric) -> Metric | None:
        """One metric doing the work of ``self`` and ``other`` (shared reductions), or None."""
        return None

    def clone(self) -> Metric:
        """A fresh instance with the same configuration (one per layer × topic × phase)."""
        fresh = copy.deepcopy(self)
        fresh.reset()
        return fresh

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

