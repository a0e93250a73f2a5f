"""TensorFlow integration: ``with sonde.tensorflow.probe_session(session, loss=loss):`` for TF1-style graphs.

The implementation lives in :mod:`sonde.probe.tensorflow` (one module per framework adapter).
"""

from __future__ import annotations

from sonde.probe.tensorflow import probe_session

__all__ = ["probe_session"]
