"""The adapter kit: what every framework adapter uses, written once.

* **keywords**: :class:`ProbeOptions`, the keywords every adapter takes (:func:`sonde.probe`'s,
  less the optimizer, which each framework names its own way), and :data:`LayerFilter`;
* **layer selection**: :func:`choose_layers` (which layers are probed) and :func:`deepest_owners`
  (which layer a parameter's statistics belong to);
* **naming**: :class:`CallNames`, a layer's first call in a pass keeps its name, later calls are
  ``name:2``, ``name:3``, ...;
* **what a call captures**: :func:`first_leaf`, the first floating-point tensor of a layer's
  input or output, depth-first through containers, and :func:`replace_leaf`;
* **parameters**: :func:`param_topic` (the weight-vs-bias rule) and :class:`ParameterPublisher`
  (values, gradients and updates);

and :class:`~sonde.probe.core.Probe`, in ``core.py``, holds the step protocol. A new framework
adapter is one module that finds its layers, hooks their calls and its optimizer, and hands the
tensors to these.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from sonde.errors import ConfigError, LayerFilterError
from sonde.probe.distributed import local_shard
from sonde.topics import GRADS_AND_UPDATES, PARAM_TOPICS

if TYPE_CHECKING:
    from sonde.metrics.base import Metric
    from sonde.probe.core import Probe
    from sonde.schedules import Schedule
    from sonde.sinks import Sink

__all__ = [
    "KEYWORDS",
    "CallNames",
    "LayerFilter",
    "ParameterPublisher",
    "Patches",
    "ProbeOptions",
    "check_keywords",
    "choose_layers",
    "deepest_owners",
    "first_leaf",
    "param_topic",
    "replace_leaf",
]

# -- keywords ----------------------------------------------------------------------------------

#: ``layers=``: a callable ``(name, layer) -> bool``, a name or glob, or a list of them.
LayerFilter = Callable[[str, Any], bool] | Sequence[str] | str | None


class ProbeOptions(TypedDict, total=False):
    """The keywords every adapter takes (see :func:`sonde.probe`); the defaults are in brackets.

    ``run`` [model class name, made unique], ``store`` [``"sonde.db"``], ``server`` [None],
    ``layers`` [None], ``topics`` [all], ``metrics`` [all built-ins], ``every`` [None: the
    overhead budget spaces each metric], ``budget`` [0.05], ``max_interval`` [100], ``depth``
    [None], ``sinks`` [None], ``resume`` [False], ``per_rank`` [False].
    """

    run: str | None
    store: Any
    server: Any
    layers: LayerFilter
    topics: Sequence[str] | None
    metrics: Sequence[str | Metric] | None
    every: int | Schedule | None
    budget: float
    max_interval: int
    depth: int | None
    sinks: Sequence[str | Sink] | None
    resume: bool
    per_rank: bool


#: The names of :class:`ProbeOptions`, in :func:`sonde.probe`'s order.
KEYWORDS: tuple[str, ...] = tuple(ProbeOptions.__annotations__)


def check_keywords(owner: str, given: Iterable[str], accepted: Iterable[str] = KEYWORDS, note: str = "") -> None:
    """Raise a ConfigError naming what ``owner`` got that it does not take, and what it takes.

    Example:
        >>> check_keywords("SondeCallback", ["evry"])
        Traceback (most recent call last):
        ...
        sonde.errors.ConfigError: SondeCallback got unexpected keyword(s) evry; it takes budget, depth, every, ...
    """
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ConfigError(f"{owner} got unexpected keyword(s) {', '.join(unknown)}; it takes "
                          + ", ".join(sorted(accepted)) + note)


# -- layer selection ---------------------------------------------------------------------------


def choose_layers(named: Sequence[tuple[str, Any, int, bool, bool]], layers: Any, depth: int | None,
                  model_name: str) -> dict[str, Any]:
    """The layers to probe, by name, in model order: the one rule of every adapter.

    ``named``: ``(name, layer, level, is_leaf, owns_parameters)`` for every layer, level 1 for the
    root's children (level 0, the root itself, only where the framework lets it own parameters).
    ``depth=None``: leaves and layers owning parameters of their own; ``depth=k``: layers k levels
    down, plus shallower leaves so that no branch is dropped. ``layers`` (names, globs or a
    callable ``(name, layer) -> bool``) filters those; given without ``depth`` it may name any
    layer, leaf or not.
    """
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"depth= expects None or an int >= 1, got {depth!r}")
    if depth is None and layers is not None:
        candidates = [(n, m) for n, m, level, _, owns in named if level > 0 or owns]
    elif depth is None:
        candidates = [(n, m) for n, m, _, leaf, owns in named if leaf or owns]
    else:
        candidates = [(n, m) for n, m, level, leaf, _ in named if level == depth or (level < depth and leaf)]
    if layers is None:
        chosen = candidates
    elif callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"layers= expects a callable or a list of names/globs, got {layers!r}")
        chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        examples = ", ".join(repr(n) for n, _ in candidates[:8]) or "(the model has no submodules)"
        raise LayerFilterError(f"layer filter {layers!r} (depth={depth}) matched no layer of {model_name}; "
                               f"names look like {examples}")
    return dict(chosen)


def deepest_owners(layers: dict[str, Any], held: Callable[[Any], Iterable[Any]]) -> dict[str, list[Any]]:
    """Each parameter (``held(layer)``: all a layer holds, its sublayers' included) goes to the
    deepest probed layer that holds it; a layer's depth is the dots in its name."""
    owners: dict[str, list[Any]] = {}
    taken: set[int] = set()
    for name in sorted(layers, key=lambda n: -n.count(".")):
        for param in held(layers[name]):
            if id(param) not in taken:
                taken.add(id(param))
                owners.setdefault(name, []).append(param)
    return owners


# -- naming ------------------------------------------------------------------------------------


class CallNames:
    """The names of layer calls in one forward pass: a layer's first call keeps its name, later
    calls are ``name:2``, ``name:3``, ... (a shared ReLU is three layers, not a cycle).

    Example:
        >>> names = CallNames()
        >>> [names("relu"), names("fc"), names("relu")]
        ['relu', 'fc', 'relu:2']
        >>> names.clear(); names("relu")
        'relu'
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        count = self._counts.get(name, 0) + 1
        self._counts[name] = count
        return name if count == 1 else f"{name}:{count}"

    def clear(self) -> None:
        """A new pass begins: names restart."""
        self._counts.clear()


# -- what a call captures ----------------------------------------------------------------------


def first_leaf(value: Any, accept: Callable[[Any], bool],
               flatten: Callable[[Any], Iterable[Any]] | None = None) -> Any | None:
    """The first leaf of ``value`` that ``accept`` takes, or None: the first floating-point tensor
    of a layer's input or output (LSTM's ``(output, (h, c))`` gives ``output``).

    Depth-first through dicts (their values), lists, tuples and dataclass instances, or through
    ``flatten``'s leaves (``tf.nest.flatten``, ``jax.tree.leaves``) where a framework has its own.
    A value ``accept`` takes is not searched further (the common case, one tensor, costs one call).
    """
    if accept(value):
        return value
    if flatten is not None:
        return next((leaf for leaf in flatten(value) if accept(leaf)), None)
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    else:
        return None
    for item in items:
        found = first_leaf(item, accept)
        if found is not None:
            return found
    return None


def replace_leaf(value: Any, old: Any, new: Any) -> Any:
    """``value`` with the leaf ``old`` (found by :func:`first_leaf`) replaced by ``new``, the
    containers on the way rebuilt as their own type."""
    if value is old:
        return new
    if isinstance(value, dict):
        return type(value)((k, replace_leaf(v, old, new)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = [replace_leaf(v, old, new) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {f.name: replace_leaf(getattr(value, f.name), old, new) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changed)
    return value


# -- parameters ----------------------------------------------------------------------------------


def param_topic(name: str) -> str:
    """``"biases"`` for a parameter whose own name (after the last dot) starts with ``bias``
    (``bias``, ``bias_ih_l0``), else ``"weights"``.

    Example:
        >>> param_topic("encoder.0.bias"), param_topic("encoder.0.weight"), param_topic("kernel")
        ('biases', 'weights', 'weights')
    """
    return "biases" if name.rsplit(".", 1)[-1].startswith("bias") else "weights"


def _same(value: Any) -> Any:
    return value


class ParameterPublisher:
    """What a probe publishes of parameters: each one's value (``weights``/``biases``), its
    gradient (``weight_grads``/``bias_grads``) and its update (``weight_updates``/``bias_updates``:
    after minus before the optimizer step, read by the metrics' own pass, never materialised).

    Adapters that see the step from the outside call :meth:`before_step` in the optimizer's
    pre-step hook and :meth:`after_step` in its post-step hook; the values before the step are
    kept in buffers reused across steps (reallocating costs page faults), filled by the same
    pass that reads the values. Adapters that record the step inside a compiled function get
    every parameter's value before, gradient and value after at once: :meth:`publish`.

    A parameter sharded across ranks (FSDP2's ``DTensor``) is read as this rank's local shard, as
    is its gradient, and its update is the local shard after minus before
    (:func:`sonde.probe.distributed.local_shard`): the ranks' states merge into the whole
    parameter's statistics.

    Args:
        probe: the probe that publishes (its :meth:`~sonde.probe.core.Probe.wants` decides).
        convert: the framework's arrays as torch tensors (:func:`~sonde.probe.core.shared_tensor`),
            applied only to what is published.
    """

    def __init__(self, probe: Probe, convert: Callable[[Any], torch.Tensor] = _same) -> None:
        self.probe = probe
        self.convert = convert
        self._before: list[tuple[str, str, Any, torch.Tensor]] = []  # (layer, update topic, param, before)
        self._buffers: dict[int, torch.Tensor] = {}

    def publish(self, layer: str, kind: str, before: Any, grad: Any = None, after: Any = None, *,
                phase: str = "train") -> None:
        """Publish one parameter's topics the schedule wants; ``kind``: ``"weights"`` or ``"biases"``."""
        probe, convert = self.probe, self.convert
        grad_topic, update_topic = GRADS_AND_UPDATES[kind]
        if probe.wants(kind, phase):
            probe.publish(layer, kind, convert(before), phase=phase)
        if grad is not None and probe.wants(grad_topic, phase):
            probe.publish(layer, grad_topic, convert(grad), phase=phase)
        if after is not None and probe.wants(update_topic, phase):
            # a tensor of its own: a metric reading the update materialises it into ``minus``'s memory
            probe.publish(layer, update_topic, convert(after), phase=phase, minus=convert(before))

    def before_step(self, params: Iterable[tuple[str, str, Any]], value: Callable[[Any], Any],
                    grad: Callable[[Any], Any] | None = None, updated: Callable[[Any], bool] | None = None, *,
                    shown: Callable[[Any], bool] | None = None, phase: str = "train") -> None:
        """Publish the value and gradient of each ``(layer, name, param)``, and keep its value
        for :meth:`after_step` where its update is wanted.

        ``value(param)``/``grad(param)``: its value and gradient (None: it has none);
        ``updated(param)``: whether the optimizer steps it (None: no update follows);
        ``shown(param)``: whether its value is published as ``weights``/``biases`` (None: all are;
        a parametrized module's tensors publish the value they compute instead).
        """
        probe = self.probe
        self._before.clear()
        wants = {topic: probe.wants(topic) for topic in PARAM_TOPICS}  # one question per topic, not per parameter
        if not any(wants.values()):
            return  # a step that records no parameter topic (most steps, under a budget)
        for layer, name, param in params:
            kind = param_topic(name)
            grad_topic, update_topic = GRADS_AND_UPDATES[kind]
            keep = updated is not None and wants[update_topic] and updated(param)
            show = wants[kind] and (shown is None or shown(param))
            if keep or show:
                tensor = self.convert(local_shard(value(param)))  # only then: reading may wait for the framework
                before = self._buffer_for(param, tensor) if keep else None
                if before is not None:
                    self._before.append((layer, update_topic, param, before))
                if show:
                    probe.publish(layer, kind, tensor, phase=phase, copy_to=before)
                elif before is not None:
                    before.copy_(tensor)
            gradient = grad(param) if grad is not None and wants[grad_topic] else None
            if gradient is not None:
                probe.publish(layer, grad_topic, self.convert(local_shard(gradient)), phase=phase)

    def after_step(self, value: Callable[[Any], Any]) -> None:
        """Publish the updates kept by :meth:`before_step`: ``value(param)`` minus the value before."""
        for layer, topic, param, before in self._before:
            self.probe.publish(layer, topic, self.convert(local_shard(value(param))), phase="train", minus=before)
        self._before.clear()

    def clear(self) -> None:
        """Drop the kept values and the buffers (the probe detaches)."""
        self._before.clear()
        self._buffers.clear()

    def _buffer_for(self, param: Any, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(id(param))
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            self._buffers[id(param)] = buffer
        return buffer


class Patches:
    """Attributes an adapter sets on the user's objects (a layer's ``call``, an optimizer's ``apply``)
    for the probe's lifetime; :meth:`restore` puts each back, or removes it where the object had none
    of its own, in reverse order.

    Example:
        >>> class Layer:
        ...     def call(self): return "plain"
        >>> layer, patches = Layer(), Patches()
        >>> patches.set(layer, "call", lambda: "recorded")
        >>> layer.call(), patches.restore(), layer.call()
        ('recorded', None, 'plain')
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """Set ``obj.attr`` to ``value`` (on the instance, bypassing any ``__setattr__``) until :meth:`restore`."""
        had = attr in obj.__dict__
        old = obj.__dict__.get(attr)
        object.__setattr__(obj, attr, value)

        def undo() -> None:
            if had:
                object.__setattr__(obj, attr, old)
            else:
                object.__delattr__(obj, attr)

        self._undo.append(undo)

    def restore(self) -> None:
        """Undo every :meth:`set`, last first."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
