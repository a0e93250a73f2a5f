"""Lightning integration: ``Trainer(callbacks=[sonde.lightning.SondeCallback()])``.

The implementation lives in :mod:`sonde.probe.lightning` (one module per framework adapter).
"""

from __future__ import annotations

from sonde.probe.lightning import SondeCallback

__all__ = ["SondeCallback"]
