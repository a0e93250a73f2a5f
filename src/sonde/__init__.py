"""sonde: probes for every layer of a neural network while it trains.

Example:
    >>> import sonde
    >>> sorted(sonde.__all__)[:3]
    ['ConfigError', 'LayerFilterError', 'Probe']
"""

from __future__ import annotations

from sonde.errors import ConfigError, LayerFilterError, ProbeError, RunExistsError, SondeError, StoreError
from sonde.load import load
from sonde.probe import Probe, probe
from sonde.records import Record
from sonde.schedules import every, log_spaced
from sonde.topics import TOPICS

__all__ = [
    "TOPICS",
    "ConfigError",
    "LayerFilterError",
    "Probe",
    "ProbeError",
    "Record",
    "RunExistsError",
    "SondeError",
    "StoreError",
    "every",
    "load",
    "log_spaced",
    "probe",
]

__version__ = "0.1.0"
