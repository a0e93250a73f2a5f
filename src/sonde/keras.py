"""Keras integration: ``model.fit(..., callbacks=[sonde.keras.SondeCallback()])`` (Keras 3 on the
TensorFlow, JAX or torch backend).

The implementation lives in :mod:`sonde.probe.keras` (one module per framework adapter).
"""

from __future__ import annotations

from sonde.probe.keras import SondeCallback

__all__ = ["SondeCallback"]
