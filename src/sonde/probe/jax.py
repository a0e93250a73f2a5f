"""``sonde.jax.probe``: probes for Flax NNX models, in eager code and under ``nnx.jit``.

How: each probed module (and the root) gets a subclass of its own class whose ``__call__`` adds
ordered host callbacks (``io_callback(..., ordered=True)``): the layer's input and output on the way forward,
and, through an identity with a custom gradient, the gradient flowing back into its output.
The optimizer (``nnx.Optimizer``) gets the same treatment for ``update``: one callback with every
parameter before the update, its gradient, and after. The callbacks are compiled into the
user's own jitted step, so the step stays one XLA computation; being *ordered*, they reach the
host in program order, which is what files them: a forward pass followed by an optimizer
update is training step k, a forward pass with no update (evaluation) is filed as ``eval`` at
the step whose weights it used. Closing the probe waits for the callbacks still in flight
(``jax.effects_barrier``) and puts every class back, so later traces are the model's own.

JAX has no training mode: a pass is training when an update follows it. ``Probe.log`` first
waits for the callbacks of the steps already dispatched, so a logged loss lands in its own step.
Layer names are NNX attribute paths joined with dots (``blocks.0.lin``); the default selection,
``layers=`` and ``depth=`` follow the PyTorch rules. Parameters whose name starts with ``bias``
are biases, every other ``nnx.Param`` is a weight.

Each pass's first callback asks the host whether the schedule (``every=``) records the pass (a
pass traced under a gradient transformation is training; any other is an evaluation, always
recorded), and the tensors are sent under ``lax.cond`` on the answer: a step that is not recorded
transfers nothing. The kernel's calls (below) come before the branch and, told the answer, read
nothing on such a step, so that no large array is the branch's operand: XLA's CPU conditionals
cost by the size of their operands, taken or not.

Statistics in the step (:attr:`JaxProbe.device_statistics`, the default): where every metric
subscribed to a topic reads only the tensor statistics (:class:`~sonde.metrics.TensorStats` and its
one-statistic names), histogram counts (:class:`~sonde.metrics.Histogram`) or Records
(``update_ratio``), the step computes the raw partials the torch path computes
(:func:`sonde.functional.summarize_raw`: shift, shifted sum and sum of squares, min, max, absolute
sum, non-zero, NaN and Inf counts) and each histogram's counts, and only those numbers cross to
the host: a few dozen per tensor instead of the tensor. On the CPU they are taken by sonde's fused
statistics kernel, called as an XLA custom call that reads the step's buffers in place
(:mod:`sonde.probe.jax_kernel`); on accelerators, and for tensors the kernel does not take (not
float32, more than 64 bins) or with :attr:`JaxProbe.statistics_kernel` off, by ``jnp``
reductions. The histogram's edges are the host's (the pass's first callback returns them, fixed
or pending, per tensor); before they exist the counts are taken over the tensor's own range, as
on the host. The host hands the partials to the metrics through
:meth:`sonde.metrics.Capture.provide`, so they fold them exactly as the torch adapter's. Topics
with any other metric (one that reads samples) send the whole array, as does every topic on a CPU
where the kernel is unavailable (no C compiler, ``SONDE_NATIVE=0``): the host takes the statistics
then, as it does for any tensor it receives.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import torch
from flax import nnx
from jax.experimental import io_callback

from sonde import functional as F
from sonde.errors import ConfigError, ProbeError
from sonde.metrics.base import Capture
from sonde.metrics.stats import Histogram, TensorStats, UpdateRatio
from sonde.probe import jax_kernel, kit
from sonde.probe.core import Probe, shared_tensor
from sonde.topics import GRADS_AND_UPDATES, PARAM_TOPICS

GRAD_TOPICS = tuple(grad for grad, _ in GRADS_AND_UPDATES.values())
UPDATE_TOPICS = tuple(update for _, update in GRADS_AND_UPDATES.values())

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["JaxProbe", "probe", "select_layers"]

log = logging.getLogger("sonde")


def _name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _own_params(module: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in vars(module).items() if isinstance(v, nnx.Param)]


def select_layers(model: Any, layers: kit.LayerFilter = None, depth: int | None = None) -> dict[str, Any]:
    """The NNX modules to probe, by dotted path (:func:`~sonde.probe.kit.choose_layers`'s rule)."""
    modules = {_name(path): m for path, m in nnx.iter_modules(model) if path}
    named = [(n, m, n.count(".") + 1, not any(o.startswith(n + ".") for o in modules), bool(_own_params(m)))
             for n, m in modules.items()]
    return kit.choose_layers(named, layers, depth, type(model).__name__)


def _value(variable: Any) -> Any:
    """A variable's array (``get_value`` since Flax 0.12, ``.value`` before); other leaves as they are."""
    get = getattr(variable, "get_value", None)
    if get is not None:
        return get()
    return getattr(variable, "value", variable)


def _under_grad(model: Any) -> bool:
    """Whether ``model``'s parameters are being differentiated (at trace time): the pass trains."""
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        return type(_value(variable)).__name__ in ("JVPTracer", "LinearizeTracer")
    return False


def _first_float(values: Any) -> Any:
    return kit.first_leaf(values, _is_float, jax.tree.leaves)


def _is_float(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and bool(jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating))


_BOOL = jax.ShapeDtypeStruct((), np.bool_)
_UNKNOWN = (0.0, 0.0, 0.0, 0.0)  # a histogram edge row: [known, lo, hi, bins / (hi - lo)]
Slot = tuple[str, str, int]  # (layer, topic, bins): a histogram whose edges the host hands the step


def _reducible(templates: Any) -> tuple[int, ...] | None:
    """The histogram bin counts of a topic whose metrics the device can serve (statistics,
    histograms, metrics of Records), or None when one of them reads the tensor itself."""
    bins: set[int] = set()
    for metric in templates:
        if type(metric) is Histogram:
            bins.add(metric.bins)
        elif not isinstance(metric, (TensorStats, UpdateRatio)):
            return None
    return tuple(sorted(bins))


def _reduce(x: Any, minus: Any, edges: dict[int, tuple[Any, Any]]) -> dict[str, Any]:
    """Traced: the raw summary partials of ``x`` (``x - minus`` when given) and its histogram
    counts, per bin count, over ``edges[bins] = (row, fallback)``: the host's edge row when it
    knows the edges, else ``fallback`` (lo, hi), else the tensor's own min..max. Mirrors
    :func:`sonde.functional.summarize_raw` and :func:`sonde.functional.histogram_counts`."""
    jnp = jax.numpy
    v = jnp.ravel(x)
    if v.dtype != jnp.float64:
        v = v.astype(jnp.float32)  # reductions in float32 at least
    if minus is not None:
        v = v - jnp.ravel(minus).astype(v.dtype)
    if v.size == 0:
        return {"floats": jnp.zeros(6, v.dtype), "ints": jnp.zeros(4, jnp.int32),
                "counts": {b: jnp.zeros(b, jnp.int32) for b in edges}}
    first = v[0]
    shift = jnp.where(jnp.isfinite(first), first, jnp.zeros_like(first))
    centred = v - shift
    lo, hi = jnp.min(v), jnp.max(v)
    floats = jnp.stack([shift, centred.sum(), jnp.dot(centred, centred), lo, hi, jnp.abs(v).sum()])
    # finite extremes mean no NaN and no Inf (min and max propagate NaN): two passes saved, as on the host
    nonfinite = jax.lax.cond(jnp.isfinite(lo) & jnp.isfinite(hi), lambda a: jnp.zeros(2, jnp.int32),
                             lambda a: jnp.stack([jnp.isnan(a).sum(), jnp.isinf(a).sum()]).astype(jnp.int32), v)
    ints = jnp.concatenate([jnp.stack([jnp.asarray(v.size), jnp.count_nonzero(v)]).astype(jnp.int32), nonfinite])
    counts = {}
    for bins, (row, fallback) in edges.items():
        low, high = (lo, hi) if fallback is None else fallback
        known = row[0] > 0
        low = jnp.where(known, row[1], low)
        scale = jnp.where(known, row[3], bins / (jnp.where(known, row[2], high) - low))
        position = jnp.clip((v - low) * scale, 0, bins - 1)
        valid = ~jnp.isnan(position)
        index = jnp.where(valid, position, 0).astype(jnp.int32)
        counts[bins] = jnp.zeros(bins, jnp.int32).at[index].add(valid.astype(jnp.int32))
    return {"floats": floats, "ints": ints, "counts": counts}


def _reduce_kernel(x: Any, minus: Any, edges: dict[int, tuple[Any, Any]], wanted: Any) -> dict[str, Any]:
    """Traced, on the CPU: :func:`_reduce`'s partials and counts by sonde's fused kernel, read
    in place from the step's buffers (:mod:`sonde.probe.jax_kernel`), one call per bin count;
    zeros, reading nothing, where ``wanted`` is false."""
    jnp = jax.numpy
    words = {}
    for bins, (row, fallback) in (edges or {0: (jnp.zeros(4, jnp.float32), None)}).items():
        if fallback is not None:
            lo, hi = fallback
            row = jnp.where(row[0] > 0, row, jnp.stack([jnp.ones_like(lo), lo, hi, bins / (hi - lo)]))
        words[bins] = jax_kernel.partials(x, minus, row, bins, wanted)
    return {"kernel": words}


def _extremes(partials: dict[str, Any]) -> tuple[Any, Any]:
    """Traced: the (min, max) of a tensor's partials, from either reduction."""
    if "kernel" in partials:
        return jax_kernel.extremes(next(iter(partials["kernel"].values())))
    return partials["floats"][3], partials["floats"][4]


def _unpacked(payload: dict[str, Any]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Host: the ten raw partials (:func:`sonde.functional.summarize_raw`'s order, float64) and
    the counts per bin count of either reduction's payload."""
    if "kernel" in payload:
        parts = {bins: jax_kernel.unpack(words) for bins, words in payload["kernel"].items()}
        return next(iter(parts.values()))[0], {bins: counts for bins, (_, counts) in parts.items() if bins}
    n, nonzeros, nans, infs = (int(v) for v in payload["ints"])
    raw = np.array([n, *np.asarray(payload["floats"], np.float64).tolist(), nonzeros, nans, infs])
    return raw, {bins: np.asarray(counts, np.int64) for bins, counts in payload["counts"].items()}


def _send(flag: Any, callback: Callable[..., None], *arrays: Any,
          prepare: Callable[..., list[Any]] | None = None, reduces: bool = False, gated: bool = False) -> None:
    """``callback(*arrays)`` on the host, in program order, only when ``flag`` (traced) is true:
    a step the schedule does not record transfers nothing. ``prepare`` (traced in the same branch,
    so an unrecorded step skips it too) turns the arrays into what crosses: their partials when
    ``reduces``. ``gated``: ``prepare`` itself computes nothing unless ``flag`` (the kernel's
    calls and their own branches), so it runs before the branch, and the branch's operands are
    only what crosses: a branch's operands cost XLA's CPU conditional by their size, taken or not.

    Every host call is an *ordered* ``io_callback``: ordered effects are ordered within their kind
    only, and the decisions (``_on_begin``, ``_on_update_begin``) return values, which debug
    callbacks cannot. The arrays go through ``stop_gradient`` so that the callback never needs a
    derivative under ``grad``.
    """
    def send(*a: Any) -> None:
        if prepare is not None:
            # the barrier keeps XLA from hoisting the reductions out of the branch
            a = tuple(prepare(*(jax.lax.optimization_barrier(a) if reduces else a)))
        io_callback(callback, None, *a, ordered=True)

    operands = [jax.lax.stop_gradient(a) for a in arrays]
    if gated and prepare is not None:
        operands, prepare = prepare(*operands), None
    jax.lax.cond(flag, send, lambda *a: None, *operands)


class JaxProbe(Probe):
    """Probe of a Flax NNX model; see :func:`probe`."""

    framework = "jax"
    #: Where the default statistics are taken: True, in the step (only they cross to the host);
    #: False, on the host from the arrays; None (default): in the step, except on a CPU where
    #: sonde's kernel is unavailable: there the arrays cross, which measured faster than ``jnp``
    #: reductions in the step (``benchmarks/jax_overhead.py``).
    device_statistics: bool | None = None
    #: On the CPU, whether the step takes the statistics with sonde's fused kernel as an XLA custom
    #: call (:mod:`sonde.probe.jax_kernel`) where it compiles; False: with ``jnp`` reductions under
    #: ``device_statistics = True``, else on the host.
    statistics_kernel: bool = True

    def __init__(self, model: Any, *, optimizer: Any = None, **options: Unpack[kit.ProbeOptions]) -> None:
        if not isinstance(model, nnx.Module):
            raise ProbeError(f"sonde.jax.probe expects a flax.nnx.Module, got {type(model).__module__}."
                             f"{type(model).__name__} (Flax linen modules keep no state to probe; use NNX)")
        if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
            raise ConfigError(f"optimizer= expects a flax.nnx.Optimizer, got {type(optimizer).__name__}")
        if getattr(type(model), "_sonde_probe", None) is not None:
            raise ProbeError(f"{type(model).__name__} is already probed; close that probe first")
        self.model = model
        self.optimizer = optimizer
        self.layers = select_layers(model, options.get("layers"), options.get("depth"))
        self.owners = self._assign_params()
        super().__init__(model, self.layers,
                         {name: {p: _value(v).shape for p, v in self._params_of(name)} for name in self.layers},
                         optimizer=type(optimizer.tx).__name__ if optimizer is not None else None, **options)
        self.count_steps(optimizer is not None, example="nnx.Optimizer(...)", passes="forward passes")
        self.param_publisher = kit.ParameterPublisher(self, shared_tensor)
        self._lock = threading.RLock()  # callbacks run on JAX's runtime thread, log() on the caller's
        self._pass: list[tuple[str, str, Any]] = []  # the current forward pass's captures, phase not yet known
        self.call_names = kit.CallNames()  # of the layers called in the pass being traced (trace time)
        self._taps: dict[str, Callable[..., Any]] = {}
        self._flag: Any = None  # while the root's forward is traced: whether the host records this pass
        self._edges: Any = None  # ... and the histogram edge rows it hands the pass, one per slot
        # topic -> histogram bin counts when its statistics are taken on the device; absent: arrays cross
        on_device = self.device_statistics
        cpu = jax.default_backend() == "cpu"
        self._kernel = cpu and on_device is not False and self.statistics_kernel and jax_kernel.available()
        if on_device is None:
            on_device = not cpu or self._kernel
        self._plan = {topic: plan for topic in self.bus.topics
                      if (plan := _reducible(self.bus.templates.get(topic, ()))) is not None} if on_device else {}
        self._slots: dict[Slot, int] = {}  # forward histograms -> their row (trace time)
        self._capacity = 6 * max(1, len(self.layers))  # rows per pass: three topics of two calls per layer
        self._sent: dict[Slot, tuple[float, float] | None] = {}  # edges handed to the pass (host)
        self._sent_update: dict[Slot, tuple[float, float] | None] = {}  # ... and to the update
        self._passes = 0  # forward passes begun (host)
        self._restore: list[tuple[Any, type]] = []
        self._attach()

    # -- attaching -------------------------------------------------------------------------------
    def _assign_params(self) -> dict[tuple[Any, ...], str]:
        """Each parameter (by path) goes to the deepest probed layer above it."""
        owners: dict[tuple[Any, ...], str] = {}
        names = sorted(self.layers, key=lambda n: -n.count("."))
        for path, _ in nnx.to_flat_state(nnx.state(self.model, nnx.Param)):
            dotted = _name(path)
            owner = next((n for n in names if dotted.startswith(n + ".")), None)
            if owner is not None:
                owners[tuple(path)] = owner
        return owners

    def _params_of(self, layer: str) -> list[tuple[str, Any]]:
        state = nnx.to_flat_state(nnx.state(self.model, nnx.Param))
        return [(_name(path), v) for path, v in state if self.owners.get(tuple(path)) == layer]

    def _swap(self, obj: Any, attrs: dict[str, Any]) -> None:
        cls = type(obj)
        obj.__class__ = type(cls.__name__, (cls,), {**attrs, "__module__": cls.__module__, "_sonde_probe": self})
        self._restore.append((obj, cls))

    def _attach(self) -> None:
        root_call = type(self.model).__call__

        def root(module: Any, *args: Any, **kwargs: Any) -> Any:
            self.call_names.clear()  # trace time (or every eager call): names restart with each pass
            # the host files the last pass and says whether this one is recorded (every=); a pass under
            # a gradient transform is training, any other an evaluation (recorded whenever it happens)
            begin = functools.partial(self._on_begin, _under_grad(module))
            rows = jax.ShapeDtypeStruct((self._capacity, 4), np.float32)
            self._flag, self._edges = io_callback(begin, (_BOOL, rows), ordered=True)
            try:
                return root_call(module, *args, **kwargs)
            finally:
                self._flag = self._edges = None  # tracers of this trace: never used by another

        for name, module in self.layers.items():
            # a container (nnx.List) is never called: it holds its children's weights (depth=), no activations
            if inspect.getattr_static(module, "__call__", None) is not None:
                self._swap(module, {"__call__": self._layer_call(name, type(module).__call__)})
        if not any(m is self.model for m in self.layers.values()):
            self._swap(self.model, {"__call__": root})
        if self.optimizer is not None:
            self._swap(self.optimizer, {"update": self._update(type(self.optimizer).update)})

    def detach(self) -> None:
        try:
            jax.effects_barrier()  # callbacks of steps already dispatched reach the bus first
        finally:
            for obj, cls in reversed(self._restore):
                obj.__class__ = cls
            self._restore.clear()

    # -- traced: what the callbacks carry --------------------------------------------------------
    def _layer_call(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def probed_call(module: Any, *args: Any, **kwargs: Any) -> Any:
            layer = self.call_names(name)
            x = _first_float((args, kwargs))
            output = call(module, *args, **kwargs)
            y = _first_float(output)
            if y is None:
                return output
            arrays = {"activations": y} if x is None else {"inputs": x, "activations": y}
            flag = self._flag if self._flag is not None else np.bool_(True)
            edges = self._edges
            topics = tuple(arrays)

            def prepare(*values: Any) -> list[Any]:
                return [self._payload(layer, topic, a, edges, flag) for topic, a in zip(topics, values, strict=True)]

            _send(flag, functools.partial(self._on_arrays, layer, topics), *arrays.values(), prepare=prepare,
                  reduces=bool(self._plan), gated=self._kernel)
            flat, tree = jax.tree.flatten(output)
            tapped = self._tap(layer)(y, flag, edges if edges is not None else np.zeros((0, 4), np.float32))
            return jax.tree.unflatten(tree, [tapped if leaf is y else leaf for leaf in flat])

        return probed_call

    def _tap(self, layer: str) -> Callable[..., Any]:
        """An identity whose gradient hands ``output_grads`` to the host."""
        if layer not in self._taps:
            @jax.custom_vjp
            def tap(y: Any, flag: Any, edges: Any) -> Any:
                return y

            def forward(y: Any, flag: Any, edges: Any) -> tuple[Any, Any]:
                return y, (flag, edges)

            def backward(residual: Any, grad: Any) -> tuple[Any, None, None]:
                flag, edges = residual
                rows = edges if edges.shape[0] else None
                _send(flag, functools.partial(self._on_arrays, layer, ("output_grads",)), grad,
                      prepare=lambda g: [self._payload(layer, "output_grads", g, rows, flag)],
                      reduces=bool(self._plan), gated=self._kernel)
                return (grad, None, None)

            tap.defvjp(forward, backward)
            self._taps[layer] = tap
        return self._taps[layer]

    def _payload(self, layer: str, topic: str, array: Any, edges: Any, wanted: Any) -> Any:
        """Traced: what crosses for one forward tensor: its partials (:func:`_reduce`) where the
        topic's metrics allow and the pass has edge rows for its histograms, else the array."""
        plan = self._plan.get(topic)
        if plan is None or edges is None or not _is_float(array):
            return array
        rows = {}
        for bins in plan:
            slot = self._slots.get((layer, topic, bins))
            if slot is None:
                if len(self._slots) >= self._capacity:
                    return array  # more calls than rows: this one's array crosses
                slot = self._slots[(layer, topic, bins)] = len(self._slots)
            rows[bins] = (edges[slot], None)
        return self._reduce(array, None, rows, wanted)

    def _reduce(self, x: Any, minus: Any, edges: dict[int, tuple[Any, Any]], wanted: Any) -> dict[str, Any]:
        """Traced: a tensor's partials and counts, by the kernel where it applies, else by ``jnp``.
        With the kernel the caller runs this before the recorded branch (:func:`_send`'s
        ``gated``), so ``jnp`` reductions then get a branch of their own, taken when ``wanted``."""
        if (self._kernel and x.size and x.dtype == np.float32 and (minus is None or minus.dtype == np.float32)
                and all(0 < bins <= jax_kernel.MAX_BINS for bins in edges)):
            return _reduce_kernel(x, minus, edges, wanted)
        if not self._kernel:
            return _reduce(x, minus, edges)
        jnp = jax.numpy
        dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
        nothing = {"floats": jnp.zeros(6, dtype), "ints": jnp.zeros(4, jnp.int32),
                   "counts": {bins: jnp.zeros(bins, jnp.int32) for bins in edges}}

        def reduce(pair: tuple[Any, Any]) -> dict[str, Any]:
            value, less = jax.lax.optimization_barrier(pair)  # kept in the branch, as in _send
            return _reduce(value, less, edges)

        return jax.lax.cond(wanted, reduce, lambda pair: nothing, (x, minus))

    def _update(self, update: Callable[..., Any]) -> Callable[..., Any]:
        def probed_update(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            model = args[0] if len(args) > 1 else optimizer.model  # update(model, grads) or update(grads)
            grads = args[-1] if args else kwargs["grads"]
            before = {tuple(p): _value(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
            result = update(optimizer, *args, **kwargs)
            after = {tuple(p): _value(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
            gradient = {tuple(p): _value(v) for p, v in nnx.to_flat_state(grads)}
            paths = tuple(p for p in before if p in self.owners and p in gradient)
            topics = [(p, t) for p in paths for t in self._param_topics(p)]
            slots = list(dict.fromkeys((self.owners[p], t, b) for p, t in topics for b in self._plan.get(t) or ()))
            # the host files the pass as this step, says whether the step is recorded and hands the edges
            rows = jax.ShapeDtypeStruct((max(1, len(slots)), 4), np.float32)
            wanted, edges = io_callback(functools.partial(self._on_update_begin, tuple(slots)), (_BOOL, rows),
                                        ordered=True)

            def prepare(was: list[Any], grad: list[Any], now: list[Any]) -> list[Any]:
                index = {p: i for i, p in enumerate(paths)}
                payloads: list[Any] = []
                firsts: dict[tuple[str, str], tuple[Any, Any]] = {}  # depth= merges: later use the first's range
                for p, topic in topics:
                    i = index[p]
                    value, minus = (now[i], was[i]) if topic in UPDATE_TOPICS else (
                        grad[i] if topic in GRAD_TOPICS else was[i], None)
                    plan = self._plan.get(topic)
                    if plan is None:
                        payloads.append(value if minus is None else (value, minus))
                        continue
                    key = (self.owners[p], topic)
                    rows = {n: (edges[slots.index((*key, n))], firsts.get(key)) for n in plan}
                    partials = self._reduce(value, minus, rows, wanted)
                    if key not in firsts:
                        firsts[key] = _extremes(partials)
                    payloads.append(partials)
                return [payloads]

            _send(wanted, functools.partial(self._on_update, tuple(topics)), [before[p] for p in paths],
                  [gradient[p] for p in paths], [after[p] for p in paths], prepare=prepare,
                  reduces=bool(self._plan), gated=self._kernel)
            return result

        return probed_update

    # -- host: the callbacks, in program order ------------------------------------------------------
    def _param_topics(self, path: tuple[Any, ...]) -> tuple[str, ...]:
        kind = kit.param_topic(_name(path))
        return (kind, *GRADS_AND_UPDATES[kind])

    def _on_begin(self, training: bool) -> tuple[np.bool_, np.ndarray]:
        """A forward pass starts: file the last one if no update claimed it; is this one recorded?"""
        with self._lock:
            if self.closed:
                return np.bool_(False), np.zeros((self._capacity, 4), np.float32)
            if self._pass and not self.steps_on_optimizer:
                self._guard("step bookkeeping", lambda: self._file("train"))
            elif self._pass:
                self._guard("evaluation capture", lambda: self._file("eval"))
            elif not self.steps_on_optimizer and self._passes:
                self._guard("step bookkeeping", self.begin_train_forward)  # an unrecorded pass was a step
            first, self._passes = not self._passes, self._passes + 1
            # the step this pass is filed at: with an optimizer, the step its update will make (or, for an
            # evaluation, the step whose weights it uses): eval_step either way; without one, the next step
            step = self.eval_step if self.steps_on_optimizer or first else self.step + 1
            phase = "train" if training or not self.steps_on_optimizer else "eval"
            rows, self._sent = self._edge_rows(phase, list(self._slots), self._capacity)
            return np.bool_(any(self.bus.wants(t, step, phase) for t in self.bus.topics)), rows

    def _edge_rows(self, phase: str, slots: list[Slot], capacity: int
                   ) -> tuple[np.ndarray, dict[Slot, tuple[float, float] | None]]:
        """The edge row of each histogram slot (in order): the host's edges, fixed or pending."""
        rows = np.zeros((capacity, 4), np.float32)
        sent: dict[Slot, tuple[float, float] | None] = {}
        for i, (layer, topic, bins) in enumerate(slots):
            edges = sent[(layer, topic, bins)] = _pending_edges(self._histogram(phase, layer, topic, bins))
            if edges is not None:
                rows[i] = (1.0, edges[0], edges[1], bins / (edges[1] - edges[0]))
        return rows, sent

    def _histogram(self, phase: str, layer: str, topic: str, bins: int) -> Histogram | None:
        """The Histogram instance that will read ``layer``'s ``topic`` (None before its first capture)."""
        return next((m for m in self.bus.engine.instances.get((phase, layer, topic), ())
                     if type(m) is Histogram and m.bins == bins), None)

    def _on_arrays(self, layer: str, topics: tuple[str, ...], *arrays: Any) -> None:
        """The pass's captures of ``layer``: per topic, its partials (a dict) or its array."""
        with self._lock:
            if not self.closed:
                self._pass.extend((layer, topic, array) for topic, array in zip(topics, arrays, strict=True))

    def _on_update_begin(self, slots: tuple[Slot, ...]) -> tuple[np.bool_, np.ndarray]:
        """An update follows the pass: file it as this step, which the update closes (its values,
        sent next, still go to this step); are the parameters recorded, with which histogram edges?"""
        with self._lock:
            if self.closed:
                return np.bool_(False), np.zeros((max(1, len(slots)), 4), np.float32)
            self._guard("step bookkeeping", lambda: self._file("train"))
            wanted = any(self.wants(t) for t in PARAM_TOPICS)
            rows, self._sent_update = self._edge_rows("train", list(slots), max(1, len(slots)))
            self.optimizer_stepped()
            return np.bool_(wanted), rows

    def _on_update(self, topics: tuple[tuple[tuple[Any, ...], str], ...], payloads: list[Any]) -> None:
        """Each parameter's topics: partials (a dict), an array, or an update's (after, before)."""
        with self._lock:
            if self.closed:
                return

            def run() -> None:
                firsts: dict[tuple[str, str], tuple[float, float]] = {}
                for (path, topic), payload in zip(topics, payloads, strict=True):
                    layer = self.owners[path]
                    if not self.wants(topic):
                        continue
                    if isinstance(payload, dict):
                        self._publish_partials(layer, topic, payload, "train", self._sent_update, firsts)
                    elif isinstance(payload, tuple):
                        self.publish(layer, topic, shared_tensor(payload[0]), phase="train",
                                     minus=shared_tensor(payload[1]))
                    else:
                        self.publish(layer, topic, shared_tensor(payload), phase="train")

            self._guard("update capture", run)

    def _publish_partials(self, layer: str, topic: str, payload: dict[str, Any], phase: str,
                          sent: dict[Slot, tuple[float, float] | None],
                          firsts: dict[tuple[str, str], tuple[float, float]]) -> None:
        """Hand a tensor's device partials to its metrics (:meth:`Capture.provide`) in place of it."""
        raw, counts_of = _unpacked(payload)
        n = int(raw[0])
        own = (float(raw[4]), float(raw[5]))
        histograms = {}
        for bins, counts in counts_of.items():
            lo, hi = sent.get((layer, topic, bins)) or firsts.get((layer, topic)) or own
            histograms[(lo, hi, bins)] = counts
            expected = _expected_edges(self._histogram(phase, layer, topic, bins), own)
            if expected is not None and (*expected, bins) not in histograms:
                if "histogram edges" not in self._warned:  # never counts over edges the metric did not ask for
                    self._warned.add("histogram edges")
                    log.warning("sonde: %s/%s: histogram edges changed after the step began; this capture "
                                "is left out", layer, topic)
                return
        firsts.setdefault((layer, topic), own)
        stand_in = torch.zeros(()).expand(n)  # the tensor's size, no data: the metrics read the partials
        Capture.provide(self.bus.memo, stand_in, raw, histograms)
        self.publish(layer, topic, stand_in, phase=phase)

    def _file(self, phase: str) -> None:
        """Publish the pass's captures under ``phase`` (training: the step this pass belongs to)."""
        captures, self._pass = self._pass, []
        if phase == "train":
            self.begin_train_forward()
        firsts: dict[tuple[str, str], tuple[float, float]] = {}
        for layer, topic, payload in captures:
            if not self.wants(topic, phase):
                continue
            if isinstance(payload, dict):
                self._publish_partials(layer, topic, payload, phase, self._sent, firsts)
            else:
                self.publish(layer, topic, shared_tensor(payload), phase=phase)

    # -- user API -----------------------------------------------------------------------------------
    def log(self, **values: Any) -> None:
        """As :meth:`Probe.log`, after the callbacks of the steps already dispatched arrived, so
        that the values land in the step that produced them."""
        jax.effects_barrier()
        with self._lock:
            labels = values.get("labels")
            if labels is not None:
                values["labels"] = shared_tensor(labels)
            super().log(**values)

    def close(self, status: str = "finished", timeout: float = 60.0) -> None:
        if self.closed:
            return
        try:
            jax.effects_barrier()
            with self._lock:
                if self._pass:
                    self._guard("last pass capture", lambda: self._file("eval" if self.steps_on_optimizer
                                                                       else "train"))
        finally:
            super().close(status, timeout)


def _pending_edges(histogram: Histogram | None) -> tuple[float, float] | None:
    """The (lo, hi) ``histogram`` will count over, when the host knows it before the capture:
    its fixed edges, or the range its first capture of the step set, if edges can span it."""
    if histogram is None:
        return None
    if histogram._range is not None:
        return histogram._range
    if histogram._device_range is not None:
        lo, hi = (float(v) for v in histogram._device_range)
        if F.histogram_edges(lo, hi, histogram.bins) is not None:
            return lo, hi
    return None


def _expected_edges(histogram: Histogram | None, own: tuple[float, float]) -> tuple[float, float] | None:
    """The (lo, hi) ``histogram`` will ask counts for from a capture whose own range is ``own``
    (None: it asks none, its edges cannot be fixed yet); mirrors :meth:`Histogram.update`."""
    if histogram is not None and histogram._range is not None:
        return histogram._range
    if histogram is not None and histogram._device_range is not None:
        lo, hi = (float(v) for v in histogram._device_range)
    else:
        lo, hi = own
    return (lo, hi) if F.histogram_edges(lo, hi, histogram.bins if histogram else 1) is not None else None


def probe(model: Any, **kwargs: Any) -> JaxProbe:
    """Attach probes to a Flax NNX ``model`` for one run; use as a context manager.

    Takes :func:`sonde.probe`'s keywords; ``optimizer=`` is the ``nnx.Optimizer`` whose updates
    are the steps (and give weights, gradients and updates).

    Example:
        >>> import jax, optax, sonde.jax                                      # doctest: +SKIP
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)  # doctest: +SKIP
        >>> with sonde.jax.probe(model, optimizer=optimizer) as p:            # doctest: +SKIP
        ...     for x, y in batches:
        ...         loss, logits = train_step(model, optimizer, x, y)        # an nnx.jit function
        ...         p.log(loss=loss, labels=y, outputs=logits)
    """
    return JaxProbe(model, **kwargs)
