"""The reference adapter: probes for any ``torch.nn.Module``, its subclasses unmodified.

Where each topic is captured:

* ``inputs``: forward pre-hook (before an in-place module overwrites its input);
* ``activations``: forward hook; the first floating-point tensor of the output, searched
  depth-first through tuples, lists, dicts and dataclasses (LSTM's ``(output, (h, c))`` gives
  ``output``; a transformer block's tuple gives its hidden states);
* ``output_grads``: a tensor hook on that output, fired by backward (for a tensor modified in
  place later, PyTorch passes the gradient of the value before the modification);
* ``weights``/``biases``/``weight_grads``/``bias_grads``: in the optimizer's pre-step hook, so
  they are exactly what the forward used and what the step consumed; without ``optimizer=``
  the parameters at the start of each train forward, and the gradients as backward
  accumulates them;
* ``weight_updates``/``bias_updates``: parameter after minus before the optimizer step.

Parameters whose name starts with ``bias`` are biases; every other parameter is a weight. A
layer owns the parameters below it that no deeper probed layer owns (for ``depth=1`` a whole
block's weights merge into one set of statistics).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sonde.errors import ConfigError, LayerFilterError, ProbeError
from sonde.graph.job import GraphJob
from sonde.metrics.base import Metric
from sonde.probe.core import Probe
from sonde.schedules import Schedule
from sonde.sinks import LayerInfo, Sink

__all__ = ["TorchProbe", "first_float_tensor", "select_layers"]

log = logging.getLogger("sonde")

ROOT = "(root)"
LayerFilter = Callable[[str, nn.Module], bool] | Sequence[str] | str | None


def first_float_tensor(value: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``value``, depth-first through containers."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    else:
        return None
    for item in items:
        found = first_float_tensor(item)
        if found is not None:
            return found
    return None


def select_layers(model: nn.Module, layers: LayerFilter = None, depth: int | None = None) -> dict[str, nn.Module]:
    """The modules to probe, by name, in registration order.

    ``depth=None``: leaf modules and any module holding parameters of its own; ``depth=k``:
    modules k levels below the root, plus shallower leaves so that no branch is dropped.
    ``layers`` (names, globs or a callable ``(name, module) -> bool``) filters those; given
    without ``depth`` it may name any module, leaf or not.
    """
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"depth= expects None or an int >= 1, got {depth!r}")
    named = [(name or ROOT, module) for name, module in model.named_modules()]
    if depth is None and layers is not None:
        candidates = [(n, m) for n, m in named if n != ROOT or _owns_params(m)]
    elif depth is None:
        candidates = [(n, m) for n, m in named if _is_leaf(m) or _owns_params(m)]
    else:
        candidates = []
        for n, m in named:
            level = 0 if n == ROOT else n.count(".") + 1
            if level == depth or (0 < level < depth and _is_leaf(m)) or (level == 0 and _is_leaf(m)):
                candidates.append((n, m))
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
        raise LayerFilterError(
            f"layer filter {layers!r} (depth={depth}) matched no layer of {type(model).__name__}; "
            f"names look like {examples}"
        )
    return dict(chosen)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _owns_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _param_topic(param_name: str) -> str:
    return "biases" if param_name.rsplit(".", 1)[-1].startswith("bias") else "weights"


class TorchProbe(Probe):
    """Probe of a ``torch.nn.Module``; see :func:`sonde.probe` for the arguments."""

    framework = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        run: str | None = None,
        store: Any = "sonde.db",
        server: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        layers: LayerFilter = None,
        topics: Sequence[str] | None = None,
        metrics: Sequence[str | Metric] | None = None,
        every: int | Schedule = 1,
        depth: int | None = None,
        sinks: Sequence[str | Sink] | None = None,
        resume: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ProbeError(
                f"sonde.probe expects a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}; "
                "for Keras use sonde.keras.SondeCallback"
            )
        if getattr(model, "_sonde_probe", None) is not None:
            raise ProbeError(
                f"{type(model).__name__} is already probed by run {model._sonde_probe().run!r}; "  # type: ignore[operator]
                "close that probe first (leave its `with` block) or probe a different model"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer= expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.layers = select_layers(model, layers, depth)
        self.params = self._assign_params()
        infos = [
            LayerInfo(name, type(module).__name__, {p: list(t.shape) for p, t in self.params.get(name, [])})
            for name, module in self.layers.items()
        ]
        config = {"every": repr(every), "depth": depth, "optimizer": type(optimizer).__name__ if optimizer else None}
        super().__init__(
            model_name=type(model).__name__, run=run, store=store, server=server, metrics=metrics, topics=topics,
            every=every, sinks=sinks, resume=resume, layers=infos, config=config,
        )
        self.steps_on_optimizer = optimizer is not None
        if optimizer is None and (self.bus.topics & {"weight_updates", "bias_updates"}):
            log.warning(
                "sonde: no optimizer= given, so weight_updates and bias_updates are unavailable and steps "
                "are counted by training-mode forward passes; pass optimizer=opt to record updates"
            )
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._names: dict[int, list[str]] = {}
        self._before: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
        self._warned: set[str] = set()
        self._buffers: dict[int, torch.Tensor] = {}
        self._attach()

    # -- attaching ---------------------------------------------------------------------------
    def _assign_params(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each parameter goes to the deepest probed layer above it."""
        owners: dict[str, list[tuple[str, nn.Parameter]]] = {}
        prefixes = sorted(self.layers, key=lambda n: -len(n))
        for full_name, param in self.model.named_parameters():
            for layer in prefixes:
                if layer == ROOT or full_name.startswith(layer + "."):
                    owners.setdefault(layer, []).append((full_name, param))
                    break
        return owners

    def _attach(self) -> None:
        model = self.model
        model._sonde_probe = weakref.ref(self)  # type: ignore[assignment]
        self._handles.append(model.register_forward_pre_hook(self._on_root_start, prepend=True))
        # The graph is traced once, from the first forward's arguments, on a background thread.
        self._graph_job = GraphJob(model, self._runners)
        self._graph_job.handle = model.register_forward_pre_hook(self._graph_job.on_forward, with_kwargs=True)
        self._handles.append(self._graph_job.handle)
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_post))
        else:
            for layer, params in self.params.items():
                for param_name, param in params:
                    if param.requires_grad:
                        topic = "bias_grads" if _param_topic(param_name) == "biases" else "weight_grads"
                        self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(layer, topic)))

    def detach(self) -> None:
        self._graph_job.wait()  # before the sinks close, so that they get the graph
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._before.clear()
        self._buffers.clear()
        if getattr(self.model, "_sonde_probe", None) is not None:
            del self.model._sonde_probe

    # -- helpers -----------------------------------------------------------------------------
    def current_phase(self) -> str:
        return "train" if self.model.training and torch.is_grad_enabled() else "eval"

    def as_tensor(self, value: Any, topic: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (int, float)):
            return torch.tensor(float(value))
        raise ConfigError(f"Probe.log({topic}=...) expects a tensor or a number, got {type(value).__name__}")

    def _guard(self, where: str, fn: Callable[[], None]) -> None:
        """Run monitoring code; a failure is reported once, loudly, and never reaches training."""
        try:
            fn()
        except Exception as exc:
            if where not in self._warned:
                self._warned.add(where)
                log.exception("sonde: %s failed; training goes on without it: %s", where, exc)

    def _publish_params(self, grads: bool, phase: str = "train") -> None:
        for layer, params in self.params.items():
            for param_name, param in params:
                topic = _param_topic(param_name)
                if self.wants(topic):
                    self.publish(layer, topic, param.detach(), phase=phase)
                grad_topic = "bias_grads" if topic == "biases" else "weight_grads"
                if grads and param.grad is not None and self.wants(grad_topic):
                    self.publish(layer, grad_topic, param.grad, phase=phase)

    # -- hooks ---------------------------------------------------------------------------------
    def _on_root_start(self, module: nn.Module, args: Any) -> None:
        def run() -> None:
            self._calls.clear()
            if self.current_phase() == "train":
                new_step = self.begin_train_forward()
                if new_step and self.optimizer is None:
                    self._publish_params(grads=False)

        self._guard("step bookkeeping", run)

    def _layer_call(self, name: str, module: nn.Module) -> str:
        count = self._calls.get(name, 0) + 1
        self._calls[name] = count
        return name if count == 1 else f"{name}:{count}"

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            call = self._layer_call(name, module)
            self._names.setdefault(id(module), []).append(call)
            phase = self.current_phase()
            if self.wants("inputs", phase):
                tensor = first_float_tensor(args)
                if tensor is not None:
                    self._guard("inputs capture", lambda: self.publish(call, "inputs", tensor, phase=phase))

        return hook

    def _post_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            stack = self._names.get(id(module))
            call = stack.pop() if stack else name
            phase = self.current_phase()
            tensor = first_float_tensor(output)
            if tensor is None:
                return
            if self.wants("activations", phase):
                self._guard("activations capture", lambda: self.publish(call, "activations", tensor, phase=phase))
            if phase == "train" and tensor.requires_grad and self.wants("output_grads"):
                step = self.step
                tensor.register_hook(self._output_grad_hook(call, step))

        return hook

    def _output_grad_hook(self, call: str, step: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self.closed and step == self.step:
                self._guard("output_grads capture", lambda: self.publish(call, "output_grads", grad, phase="train"))

        return hook

    def _grad_hook(self, layer: str, topic: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if not self.closed and param.grad is not None and self.wants(topic):
                self._guard(f"{topic} capture", lambda: self.publish(layer, topic, param.grad, phase="train"))

        return hook

    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        def run() -> None:
            self._step_started = True
            self._publish_params(grads=True)
            self._before.clear()
            want_w, want_b = self.wants("weight_updates"), self.wants("bias_updates")
            if not (want_w or want_b):
                return
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            with torch.no_grad():
                for layer, params in self.params.items():
                    for param_name, param in params:
                        is_bias = _param_topic(param_name) == "biases"
                        if id(param) in in_optimizer and (want_b if is_bias else want_w):
                            topic = "bias_updates" if is_bias else "weight_updates"
                            self._before.append((layer, topic, param, self._copy_of(param)))

        self._guard("optimizer pre-step capture", run)

    def _copy_of(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter's value now, in a buffer kept across steps (reallocating costs page faults)."""
        buffer = self._buffers.get(id(param))
        if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype:
            buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
            self._buffers[id(param)] = buffer
        return buffer.copy_(param.detach())

    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        def run() -> None:
            with torch.no_grad():
                for layer, topic, param, before in self._before:
                    # The copy becomes the update in place: no allocation on the hot path.
                    self.publish(layer, topic, torch.sub(param.detach(), before, out=before), phase="train")
            self._before.clear()

        self._guard("weight update capture", run)
        self.optimizer_stepped()
