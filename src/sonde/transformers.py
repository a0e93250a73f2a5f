"""Hugging Face ``Trainer`` integration: ``Trainer(..., callbacks=[sonde.transformers.SondeCallback()])``.

The implementation lives in :mod:`sonde.probe.transformers` (one module per framework adapter).
"""

from __future__ import annotations

from sonde.probe.transformers import SondeCallback

__all__ = ["SondeCallback"]
