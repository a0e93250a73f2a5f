"""What the torch probe sees of ``torch.amp.GradScaler``: the loss scale of each backward, and the
optimizer steps the scaler skips.

While at least one probe is open, ``GradScaler.scale`` and ``GradScaler.step`` are wrapped (on the
class, so every scaler is seen: the user's, Lightning's and the one Accelerate makes for the Hugging
Face Trainer, with no argument to pass); the last probe to close puts them back. The wrappers call
the scaler's own method unchanged and then tell each open probe's :class:`ScalerListener`; a
listener that fails is the probe's to report (it guards its own code), never the training step's.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch

__all__ = ["ScalerListener", "listen", "unlisten"]


class ScalerListener(Protocol):
    """The probe's side of the scaler wrappers."""

    def loss_scaled(self, scaler: Any, scale: torch.Tensor) -> None:
        """``scaler.scale(loss)`` multiplied by ``scale`` (the scaler's own tensor: read it, never
        write it; ``update()`` changes it in place after the step)."""

    def scaler_step_begins(self, scaler: Any, optimizer: Any) -> None:
        """``scaler.step(optimizer)`` starts (it unscales, then steps unless it found inf/NaN)."""

    def scaler_step_ended(self, scaler: Any, optimizer: Any) -> None:
        """``scaler.step(optimizer)`` returned."""


_lock = threading.Lock()
_listeners: list[ScalerListener] = []
_originals: dict[str, Any] = {}


def _scale(self: Any, outputs: Any) -> Any:
    result = _originals["scale"](self, outputs)
    scale = getattr(self, "_scale", None)
    if getattr(self, "_enabled", False) and isinstance(scale, torch.Tensor):
        for listener in list(_listeners):
            listener.loss_scaled(self, scale)
    return result


def _step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    for listener in list(_listeners):
        listener.scaler_step_begins(self, optimizer)
    result = _originals["step"](self, optimizer, *args, **kwargs)
    for listener in list(_listeners):
        listener.scaler_step_ended(self, optimizer)
    return result


def listen(listener: ScalerListener) -> None:
    """Tell ``listener`` about every GradScaler until :func:`unlisten` (wraps the class on the first)."""
    with _lock:
        if not _listeners:
            cls = torch.amp.GradScaler
            _originals["scale"], _originals["step"] = cls.scale, cls.step
            cls.scale, cls.step = _scale, _step  # type: ignore[method-assign,assignment]
        _listeners.append(listener)


def unlisten(listener: ScalerListener) -> None:
    """Stop telling ``listener``; the last one out puts the scaler's own methods back."""
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)
            if not _listeners and _originals:
                cls = torch.amp.GradScaler
                cls.scale, cls.step = _originals.pop("scale"), _originals.pop("step")  # type: ignore[method-assign]
