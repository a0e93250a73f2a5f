"""sonde: probes for every layer of a neural network while it trains.

Example:
    >>> import sonde
    >>> sorted(sonde.__all__)[:3]
    ['ConfigError', 'Graph', 'GraphError']
"""

from sonde.errors import (
    ConfigError,
    GraphError,
    LayerFilterError,
    ProbeError,
    RunExistsError,
    SondeError,
    StoreError,
)
from sonde.graph import Graph, graph  # the function shadows the subpackage name: sonde.graph(model, x)
from sonde.load import load
from sonde.probe import Probe, probe
from sonde.records import Record
from sonde.schedules import every, log_spaced
from sonde.topics import TOPICS

__all__ = [
    "TOPICS",
    "ConfigError",
    "Graph",
    "GraphError",
    "LayerFilterError",
    "Probe",
    "ProbeError",
    "Record",
    "RunExistsError",
    "SondeError",
    "StoreError",
    "every",
    "graph",
    "load",
    "log_spaced",
    "probe",
]

__version__ = "0.1.0"
