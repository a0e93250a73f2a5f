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
transfers nothing.
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
from flax import nnx
from jax.experimental import io_callback

from sonde.errors import ConfigError, ProbeError
from sonde.probe import kit
from sonde.probe.core import Probe, shared_tensor
from sonde.topics import PARAM_TOPICS

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


def _send(flag: Any, callback: Callable[..., None], *arrays: Any) -> None:
    """``callback(*arrays)`` on the host, in program order, only when ``flag`` (traced) is true:
    a step the schedule does not record transfers nothing.

    Every host call is an *ordered* ``io_callback``: ordered effects are ordered within their kind
    only, and the decisions (``_on_begin``, ``_on_update_begin``) return values, which debug
    callbacks cannot. The arrays go through ``stop_gradient`` so that the callback never needs a
    derivative under ``grad``.
    """
    jax.lax.cond(flag, lambda *a: io_callback(callback, None, *a, ordered=True), lambda *a: None,
                 *[jax.lax.stop_gradient(a) for a in arrays])


class JaxProbe(Probe):
    """Probe of a Flax NNX model; see :func:`probe`."""

    framework = "jax"

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
            self._flag = io_callback(begin, _BOOL, ordered=True)
            try:
                return root_call(module, *args, **kwargs)
            finally:
                self._flag = None  # a tracer of this trace: never used by another

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
            _send(flag, functools.partial(self._on_arrays, layer, tuple(arrays)), *arrays.values())
            flat, tree = jax.tree.flatten(output)
            tapped = self._tap(layer)(y, flag)
            return jax.tree.unflatten(tree, [tapped if leaf is y else leaf for leaf in flat])

        return probed_call

    def _tap(self, layer: str) -> Callable[..., Any]:
        """An identity whose gradient hands ``output_grads`` to the host."""
        if layer not in self._taps:
            @jax.custom_vjp
            def tap(y: Any, flag: Any) -> Any:
                return y

            def forward(y: Any, flag: Any) -> tuple[Any, Any]:
                return y, flag

            def backward(flag: Any, grad: Any) -> tuple[Any, None]:
                _send(flag, functools.partial(self._on_arrays, layer, ("output_grads",)), grad)
                return (grad, None)

            tap.defvjp(forward, backward)
            self._taps[layer] = tap
        return self._taps[layer]

    def _update(self, update: Callable[..., Any]) -> Callable[..., Any]:
        def probed_update(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            model = args[0] if len(args) > 1 else optimizer.model  # update(model, grads) or update(grads)
            grads = args[-1] if args else kwargs["grads"]
            before = {tuple(p): _value(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
            result = update(optimizer, *args, **kwargs)
            after = {tuple(p): _value(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
            gradient = {tuple(p): _value(v) for p, v in nnx.to_flat_state(grads)}
            paths = tuple(p for p in before if p in self.owners and p in gradient)
            # the host files the pass as this step and says whether the step is recorded
            wanted = io_callback(self._on_update_begin, _BOOL, ordered=True)
            _send(wanted, functools.partial(self._on_update, paths), [before[p] for p in paths],
                  [gradient[p] for p in paths], [after[p] for p in paths])
            return result

        return probed_update

    # -- host: the callbacks, in program order ------------------------------------------------------
    def _on_begin(self, training: bool) -> np.bool_:
        """A forward pass starts: file the last one if no update claimed it; is this one recorded?"""
        with self._lock:
            if self.closed:
                return np.bool_(False)
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
            return np.bool_(any(self.bus.wants(t, step, phase) for t in self.bus.topics))

    def _on_arrays(self, layer: str, topics: tuple[str, ...], *arrays: Any) -> None:
        with self._lock:
            if not self.closed:
                self._pass.extend((layer, topic, array) for topic, array in zip(topics, arrays, strict=True))

    def _on_update_begin(self) -> np.bool_:
        """An update follows the pass: file it as this step, which the update closes (its values,
        sent next, still go to this step); are the parameters recorded?"""
        with self._lock:
            if self.closed:
                return np.bool_(False)
            self._guard("step bookkeeping", lambda: self._file("train"))
            wanted = any(self.wants(t) for t in PARAM_TOPICS)
            self.optimizer_stepped()
            return np.bool_(wanted)

    def _on_update(self, paths: tuple[tuple[Any, ...], ...], before: list[Any], grads: list[Any],
                   after: list[Any]) -> None:
        with self._lock:
            if self.closed:
                return

            def run() -> None:
                for path, b, g, a in zip(paths, before, grads, after, strict=True):
                    self.param_publisher.publish(self.owners[path], kit.param_topic(_name(path)), b, g, a)

            self._guard("update capture", run)

    def _file(self, phase: str) -> None:
        """Publish the pass's captures under ``phase`` (training: the step this pass belongs to)."""
        captures, self._pass = self._pass, []
        if phase == "train":
            self.begin_train_forward()
        for layer, topic, array in captures:
            if self.wants(topic, phase):
                self.publish(layer, topic, shared_tensor(array), phase=phase)

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
