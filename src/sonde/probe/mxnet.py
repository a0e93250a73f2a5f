"""``sonde.mxnet.probe``: probes for MXNet Gluon blocks (MXNet 1.9, imperative mode).

How: each probed block's ``forward`` is wrapped on the instance. The wrapper publishes the
block's input and output, and, while autograd records, passes the output through an identity
``autograd.Function`` whose ``backward`` publishes the gradient flowing back (``output_grads``).
``Trainer.step`` is wrapped the same way: parameters and their gradients before the update, and
the update (after minus before, read in one pass). NDArrays reach the metrics through DLPack,
without a copy (``to_dlpack_for_read`` waits for MXNet's pending writes to the array).

Steps are ``trainer.step`` calls (each training forward pass without ``trainer=``). A pass
outside ``autograd.record()`` (or under ``autograd.predict_mode()``) is ``eval``, filed at the
step whose weights it used. Layer names are the children's keys joined with dots
(``features.0``, ``encoder.fc``); the default selection, ``layers=`` and ``depth=`` follow the
PyTorch rules. Parameters whose name ends in ``bias`` are biases, all others weights.

A hybridized block runs as one cached graph: its children's ``forward`` never runs, so only the
blocks that are not inside a hybridized parent are recorded. Probe before ``hybridize()`` (the
probe says so when it finds hybridized blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import mxnet as mx
import torch
from mxnet import autograd, gluon

from sonde.errors import ConfigError, ProbeError
from sonde.probe.core import Probe, choose_layers, deepest_owners
from sonde.schedules import Schedule
from sonde.sinks import LayerInfo, Sink
from sonde.topics import GRADS_AND_UPDATES

__all__ = ["MXNetProbe", "probe", "select_layers"]

log = logging.getLogger("sonde")

LayerFilter = Sequence[str] | str | Callable[[str, Any], bool] | None


def _walk(block: Any, prefix: str = "", level: int = 1) -> list[tuple[str, Any, int]]:
    out = []
    for key, child in block._children.items():
        name = f"{prefix}{key}"
        out.append((name, child, level))
        out.extend(_walk(child, name + ".", level + 1))
    return out


def select_layers(block: Any, layers: LayerFilter = None, depth: int | None = None) -> dict[str, Any]:
    """The Gluon blocks to probe, by dotted name (:func:`~sonde.probe.core.choose_layers`'s rule)."""
    named = [(n, b, level, not b._children, bool(b._reg_params)) for n, b, level in _walk(block)]
    return choose_layers(named, layers, depth, type(block).__name__)


def _first_array(value: Any) -> Any:
    if isinstance(value, mx.nd.NDArray):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_array(item)
            if found is not None:
                return found
    return None


def _to_torch(array: Any) -> torch.Tensor:
    """The NDArray's memory as a torch tensor, after MXNet's pending writes to it (no copy)."""
    return torch.from_dlpack(array.to_dlpack_for_read())


def _autograd_phase() -> str:
    return "train" if autograd.is_recording() and autograd.is_training() else "eval"


class _Tap(autograd.Function):  # type: ignore[misc]
    """Identity whose backward hands the incoming gradient to ``sink``."""

    def __init__(self, sink: Callable[[Any], None]) -> None:
        super().__init__()
        self.sink = sink

    def forward(self, x: Any) -> Any:
        return x.copy()  # an autograd.Function's output must be a new array

    def backward(self, dy: Any) -> Any:
        self.sink(dy)
        return dy


class MXNetProbe(Probe):
    """Probe of a Gluon block; see :func:`probe`."""

    framework = "mxnet"

    def __init__(
        self,
        block: Any,
        *,
        trainer: Any = None,
        run: str | None = None,
        store: Any = "sonde.db",
        server: str | None = None,
        layers: LayerFilter = None,
        topics: Sequence[str] | None = None,
        metrics: Sequence[str | Any] | None = None,
        every: int | Schedule = 1,
        depth: int | None = None,
        sinks: Sequence[str | Sink] | None = None,
        resume: bool = False,
    ) -> None:
        if not isinstance(block, gluon.Block):
            raise ProbeError(f"sonde.mxnet.probe expects a gluon.Block, got {type(block).__module__}."
                             f"{type(block).__name__}")
        if trainer is not None and not isinstance(trainer, gluon.Trainer):
            raise ConfigError(f"trainer= expects a gluon.Trainer, got {type(trainer).__name__}")
        if "forward" in vars(block):
            raise ProbeError(f"{type(block).__name__} is already probed; close that probe first")
        self.block = block
        self.trainer = trainer
        self.layers = select_layers(block, layers, depth)
        self.params = deepest_owners(self.layers, lambda block: block.collect_params().values())
        infos = [LayerInfo(name, type(b).__name__, {p.name: list(p.shape) for p in self.params.get(name, [])})
                 for name, b in self.layers.items()]
        super().__init__(model_name=type(block).__name__, run=run, store=store, server=server, metrics=metrics,
                         topics=topics, every=every, sinks=sinks, resume=resume, layers=infos,
                         config={"every": repr(every), "depth": depth,
                                 "optimizer": type(trainer._optimizer).__name__ if trainer is not None else None})
        self.steps_on_optimizer = trainer is not None
        if trainer is None and (self.bus.topics & {"weight_updates", "bias_updates"}):
            log.warning("sonde: no trainer= given, so weights, gradients and updates are unavailable and steps are "
                        "counted by training forward passes; pass trainer=gluon.Trainer(...) to record them")
        hybrid = [n for n, b in [("(root)", block), *self.layers.items()] if getattr(b, "_active", False)]
        if hybrid:
            log.warning("sonde: %s hybridized: a hybridized block runs as one cached graph, so the blocks inside "
                        "it are not recorded; probe before calling hybridize()", ", ".join(hybrid))
        self._calls: dict[str, int] = {}
        self._phase = "train"
        self._before: list[tuple[str, str, Any, Any]] = []
        self._attach()

    # -- attaching ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        root_forward = self.block.forward

        def root(*args: Any, **kwargs: Any) -> Any:
            self._guard("step bookkeeping", self._begin_pass)
            return root_forward(*args, **kwargs)

        if not any(b is self.block for b in self.layers.values()):
            self.block.forward = root
        for name, block in self.layers.items():
            block.forward = self._forward(name, block.forward)
        if self.trainer is not None:
            self.trainer.step = self._step(self.trainer.step)

    def detach(self) -> None:
        for block in [self.block, *self.layers.values()]:
            vars(block).pop("forward", None)
        if self.trainer is not None:
            vars(self.trainer).pop("step", None)

    def _begin_pass(self) -> None:
        """The root's forward starts: layer names restart, and a training pass may start a step."""
        self._calls.clear()
        self._phase = _autograd_phase()
        if self._phase == "train":
            self.begin_train_forward()

    def current_phase(self) -> str:
        """The phase of the last forward pass: ``p.log`` right after ``trainer.step`` (outside
        ``autograd.record()``) still logs the training step."""
        return self._phase

    def _forward(self, name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def probed_forward(*args: Any, **kwargs: Any) -> Any:
            if self.block is self.layers.get(name):
                self._guard("step bookkeeping", self._begin_pass)
            count = self._calls.get(name, 0) + 1
            self._calls[name] = count
            layer = name if count == 1 else f"{name}:{count}"
            phase = _autograd_phase()
            x = _first_array(args)
            if x is not None and self.wants("inputs", phase):
                self._guard("inputs capture", lambda: self.publish(layer, "inputs", _to_torch(x), phase=phase))
            output = forward(*args, **kwargs)
            y = _first_array(output)
            if y is None:
                return output
            if self.wants("activations", phase):
                self._guard("activations capture", lambda: self.publish(layer, "activations", _to_torch(y),
                                                                        phase=phase))
            if phase != "train" or not self.wants("output_grads"):
                return output
            step = self.step
            tapped = _Tap(lambda dy: self._guard("output_grads capture", lambda: self.publish(
                layer, "output_grads", _to_torch(dy), phase="train", step=step)))(y)
            if output is y:
                return tapped
            items = list(output)
            items[next(i for i, item in enumerate(items) if item is y)] = tapped
            return type(output)(items)

        return probed_forward

    def _step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def probed_step(*args: Any, **kwargs: Any) -> Any:
            self._guard("optimizer pre-step capture", self._before_update)
            result = step(*args, **kwargs)
            self._guard("weight update capture", self._after_update)
            self.optimizer_stepped()
            return result

        return probed_step

    def _before_update(self) -> None:
        self._step_started = True
        self._before.clear()
        for layer, params in self.params.items():
            for param in params:
                kind = "biases" if param.name.endswith("bias") else "weights"
                grad_topic, update_topic = GRADS_AND_UPDATES[kind]
                data = param.data()
                if self.wants(kind):
                    self.publish(layer, kind, _to_torch(data), phase="train")
                if param.grad_req != "null" and self.wants(grad_topic):
                    self.publish(layer, grad_topic, _to_torch(param.grad()), phase="train")
                if self.wants(update_topic):
                    self._before.append((layer, update_topic, param, data.copy()))

    def _after_update(self) -> None:
        for layer, topic, param, before in self._before:
            self.publish(layer, topic, _to_torch(param.data()), phase="train", minus=_to_torch(before))
        self._before.clear()

    def as_tensor(self, value: Any, topic: str) -> torch.Tensor:
        if isinstance(value, (int, float)):
            return torch.tensor(float(value))
        if isinstance(value, mx.nd.NDArray):
            return _to_torch(value)
        raise ConfigError(f"Probe.log({topic}=...) expects an NDArray or a number, got {type(value).__name__}")

    def log(self, **values: Any) -> None:
        labels = values.get("labels")
        if isinstance(labels, mx.nd.NDArray):
            values["labels"] = _to_torch(labels)
        super().log(**values)


def probe(block: Any, **kwargs: Any) -> MXNetProbe:
    """Attach probes to a Gluon ``block`` for one run; use as a context manager.

    Takes :func:`sonde.probe`'s keywords, with ``trainer=`` (a ``gluon.Trainer``) for
    ``optimizer=``: its steps are sonde's steps and give weights, gradients and updates.

    Example:
        >>> import sonde.mxnet                                              # doctest: +SKIP
        >>> with sonde.mxnet.probe(net, trainer=trainer, run="gluon-mlp") as p:  # doctest: +SKIP
        ...     for x, y in batches:
        ...         with autograd.record():
        ...             out = net(x); loss = loss_fn(out, y)
        ...         loss.backward(); trainer.step(x.shape[0])
        ...         p.log(loss=loss.mean(), labels=y, outputs=out)
    """
    return MXNetProbe(block, **kwargs)
