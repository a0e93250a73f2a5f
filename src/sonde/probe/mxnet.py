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
PyTorch rules. Parameters whose own name (after the block's prefix: ``dense0_bias``,
``lstm0_l0_i2h_bias``) starts with ``bias`` are biases, all others weights.

A hybridized block runs as one cached graph: its children's ``forward`` never runs, so only the
blocks that are not inside a hybridized parent are recorded. Probe before ``hybridize()`` (the
probe says so when it finds hybridized blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mxnet as mx
import torch
from mxnet import autograd, gluon

from sonde.errors import ConfigError, ProbeError
from sonde.probe import kit
from sonde.probe.core import Probe

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["MXNetProbe", "NDArrayProbe", "probe", "select_layers", "to_torch"]

log = logging.getLogger("sonde")


def _walk(block: Any, prefix: str = "", level: int = 1) -> list[tuple[str, Any, int]]:
    out = []
    for key, child in block._children.items():
        name = f"{prefix}{key}"
        out.append((name, child, level))
        out.extend(_walk(child, name + ".", level + 1))
    return out


def select_layers(block: Any, layers: kit.LayerFilter = None, depth: int | None = None) -> dict[str, Any]:
    """The Gluon blocks to probe, by dotted name (:func:`~sonde.probe.kit.choose_layers`'s rule)."""
    named = [(n, b, level, not b._children, bool(b._reg_params)) for n, b, level in _walk(block)]
    return kit.choose_layers(named, layers, depth, type(block).__name__)


def _first_array(value: Any) -> Any:
    return kit.first_leaf(value, lambda leaf: isinstance(leaf, mx.nd.NDArray))


def _own_name(param: Any) -> str:
    """What :func:`~sonde.probe.kit.param_topic` reads: MXNet names a parameter
    ``<block prefix>_<name>`` (``dense0_bias``, ``lstm0_l0_i2h_bias``): the part after the last ``_``."""
    return str(param.name).rsplit("_", 1)[-1]


def to_torch(array: Any) -> torch.Tensor:
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


class NDArrayProbe(Probe):
    """What the Gluon and the Symbol-module probes share: values given to :meth:`log` as NDArrays."""

    def as_tensor(self, value: Any, topic: str) -> torch.Tensor:
        if isinstance(value, (int, float)):
            return torch.tensor(float(value))
        if isinstance(value, mx.nd.NDArray):
            return to_torch(value)
        raise ConfigError(f"Probe.log({topic}=...) expects an NDArray or a number, got {type(value).__name__}")

    def log(self, **values: Any) -> None:
        labels = values.get("labels")
        if isinstance(labels, mx.nd.NDArray):
            values["labels"] = to_torch(labels)
        super().log(**values)


class MXNetProbe(NDArrayProbe):
    """Probe of a Gluon block; see :func:`probe`."""

    framework = "mxnet"

    def __init__(self, block: Any, *, trainer: Any = None, **options: Unpack[kit.ProbeOptions]) -> None:
        if not isinstance(block, gluon.Block):
            raise ProbeError(f"sonde.mxnet.probe expects a gluon.Block, got {type(block).__module__}."
                             f"{type(block).__name__}")
        if trainer is not None and not isinstance(trainer, gluon.Trainer):
            raise ConfigError(f"trainer= expects a gluon.Trainer, got {type(trainer).__name__}")
        if "forward" in vars(block):
            raise ProbeError(f"{type(block).__name__} is already probed; close that probe first")
        self.block = block
        self.trainer = trainer
        self.layers = select_layers(block, options.get("layers"), options.get("depth"))
        self.params = kit.deepest_owners(self.layers, lambda block: block.collect_params().values())
        super().__init__(block, self.layers, {name: {p.name: p.shape for p in ps} for name, ps in self.params.items()},
                         optimizer=type(trainer._optimizer).__name__ if trainer is not None else None, **options)
        self.count_steps(trainer is not None, keyword="trainer", example="gluon.Trainer(...)")
        hybrid = [n for n, b in [("(root)", block), *self.layers.items()] if getattr(b, "_active", False)]
        if hybrid:
            log.warning("sonde: %s hybridized: a hybridized block runs as one cached graph, so the blocks inside "
                        "it are not recorded; probe before calling hybridize()", ", ".join(hybrid))
        self.call_names = kit.CallNames()
        self.param_publisher = kit.ParameterPublisher(self, to_torch)
        self._phase = "train"
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
        self.call_names.clear()
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
            layer = self.call_names(name)
            phase = _autograd_phase()
            x = _first_array(args)
            if x is not None and self.wants("inputs", phase):
                self._guard("inputs capture", lambda: self.publish(layer, "inputs", to_torch(x), phase=phase))
            output = forward(*args, **kwargs)
            y = _first_array(output)
            if y is None:
                return output
            if self.wants("activations", phase):
                self._guard("activations capture", lambda: self.publish(layer, "activations", to_torch(y),
                                                                        phase=phase))
            if phase != "train" or not self.wants("output_grads"):
                return output
            step = self.step
            tapped = _Tap(lambda dy: self._guard("output_grads capture", lambda: self.publish(
                layer, "output_grads", to_torch(dy), phase="train", step=step)))(y)
            return kit.replace_leaf(output, y, tapped)

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
        self.begin_optimizer_step()
        self.param_publisher.before_step(
            ((layer, _own_name(param), param) for layer, params in self.params.items() for param in params),
            value=lambda param: param.data(),
            grad=lambda param: param.grad() if param.grad_req != "null" else None,
            updated=lambda param: True,
        )

    def _after_update(self) -> None:
        self.param_publisher.after_step(lambda param: param.data())


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
