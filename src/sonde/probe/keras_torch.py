"""Keras 3 on the torch backend: the torch adapter's hooks on the Keras model's modules.

On this backend every Keras layer is a ``torch.nn.Module`` and ``fit``'s step is eager PyTorch
(forward, ``loss.backward()``, then the Keras optimizer's ``apply``), so
:class:`KerasTorchProbe` is a :class:`~sonde.probe.torch.TorchProbe` with Keras's names and
Keras's optimizer: the same forward pre-/post-hooks take ``inputs``, ``activations`` and (through
a tensor hook fired by backward) ``output_grads``; layers are chosen and named as on TensorFlow
(:func:`sonde.probe.keras.select_layers`: ``encoder.dense``); ``weights``/``biases``, their
gradients and updates are taken around the optimizer's ``apply(gradients, variables)``, which
the probe wraps; ``loss``, ``labels`` and ``outputs`` come from the model's ``compute_loss``.
Steps are ``apply`` calls. Validation inside ``fit`` (the model in eval mode, no gradients) is
the ``eval`` phase.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from sonde.probe import kit
from sonde.probe.keras import _class_labels, check_model, select_layers, send_graph
from sonde.probe.torch import TorchProbe
from sonde.records import NETWORK

__all__ = ["KerasTorchProbe"]

log = logging.getLogger("sonde")


class KerasTorchProbe(TorchProbe):
    """Probe of a Keras 3 model on the torch backend during ``fit``; made by
    :class:`sonde.keras.SondeCallback`."""

    framework = "keras"

    def __init__(self, model: Any, **options: Any) -> None:
        check_model(model, "torch")
        self._patches = kit.Patches()
        super().__init__(model, **options)

    # -- TorchProbe's choices, the Keras way ------------------------------------------------------
    def _select_layers(self, layers: kit.LayerFilter, depth: int | None) -> dict[str, Any]:
        return select_layers(self.model, layers, depth)

    def _assign_params(self) -> dict[str, list[tuple[str, Any]]]:  # type: ignore[override]
        """Each trainable Keras variable goes to the deepest probed layer holding it."""
        owners = kit.deepest_owners(self.layers, lambda layer: layer.trainable_variables)
        return {layer: [(v.name, v) for v in variables] for layer, variables in owners.items()}

    def count_steps(self, by_optimizer: bool, **kwargs: Any) -> None:
        super().count_steps(True, **kwargs)  # steps are the Keras optimizer's applies, hooked below

    def _publish_params(self, grads: bool, phase: str = "train", snapshot: bool = False) -> None:
        """Nothing at the forward's start: the optimizer's ``apply`` publishes the parameters."""

    def _attach(self) -> None:
        model = self.model
        object.__setattr__(model, "_sonde_probe", weakref.ref(self))
        self._handles.append(model.register_forward_pre_hook(self._on_root_start, prepend=True))
        self._arm(self._records(self.step))  # the layer hooks, while a step records (TorchProbe._arm)

    def attach(self) -> None:
        """Wrap the model's ``compute_loss`` and its optimizer's ``apply``; called at
        ``on_train_begin`` (the hooks are in place from the probe's creation)."""
        self._guard("reading the model graph", lambda: send_graph(self, self.model))
        model: Any = self.model
        self._patches.set(model, "compute_loss", self._compute_loss(model.compute_loss))
        if model.optimizer is not None:
            self._patches.set(model.optimizer, "apply", self._apply(model.optimizer.apply))

    def detach(self) -> None:
        self._set_armed(False)
        self._patches.restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.param_publisher.clear()
        if getattr(self.model, "_sonde_probe", None) is not None:
            object.__delattr__(self.model, "_sonde_probe")

    # -- what the wrappers publish ----------------------------------------------------------------
    def _compute_loss(self, compute_loss: Callable[..., Any]) -> Callable[..., Any]:
        def recorded_compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = compute_loss(*args, **kwargs)
            names = ("x", "y", "y_pred", "sample_weight")
            given = {**dict(zip(names, args, strict=False)), **kwargs}
            self._guard("loss capture", lambda: self._publish_step(loss, given.get("y"), given.get("y_pred")))
            return loss

        return recorded_compute_loss

    def _publish_step(self, loss: Any, labels: Any, outputs: Any) -> None:
        phase = self.current_phase()
        if isinstance(loss, torch.Tensor) and self.wants("loss", phase):
            self.publish(NETWORK, "loss", loss.detach(), phase=phase)
        if isinstance(outputs, torch.Tensor) and self.wants("outputs", phase):
            labels = labels if isinstance(labels, torch.Tensor) else None
            self.publish(NETWORK, "outputs", outputs.detach(), phase=phase,
                         labels=_class_labels(labels, outputs.detach()))

    def _apply(self, apply: Callable[..., Any]) -> Callable[..., Any]:
        owner = {id(v): (layer, name) for layer, params in self.params.items() for name, v in params}

        def recorded_apply(grads: Any, trainable_variables: Any = None) -> Any:
            if trainable_variables is None:  # Keras's own form: apply(grads) over all its variables
                return apply(grads)
            pairs = [(g, v) for g, v in zip(grads, trainable_variables, strict=False) if id(v) in owner]
            gradient = {id(v): g for g, v in pairs}

            def before() -> None:
                self.begin_optimizer_step()
                self.param_publisher.before_step(
                    ((*owner[id(v)], v) for _, v in pairs), value=lambda v: v.value.detach(),
                    grad=lambda v: gradient[id(v)], updated=lambda v: gradient[id(v)] is not None)

            self._guard("optimizer pre-step capture", before)
            result = apply(grads, trainable_variables)
            self._guard("weight update capture", lambda: self.param_publisher.after_step(lambda v: v.value.detach()))
            self.optimizer_stepped()
            return result

        return recorded_apply

