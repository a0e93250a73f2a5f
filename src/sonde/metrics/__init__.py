"""Built-in metrics. Each registers under the ``sonde.metrics`` entry-point group, as a plugin's would.

Example:
    >>> from sonde.metrics import Histogram, registry
    >>> registry()["histogram"] is Histogram
    True
"""

from __future__ import annotations

from sonde.metrics.alerts import Alerts
from sonde.metrics.base import Capture, Metric
from sonde.metrics.registry import DEFAULT_METRICS, registry, resolve_metrics
from sonde.metrics.saturation import Saturation
from sonde.metrics.similarity import CKA, SVCCA, CKAMatrix
from sonde.metrics.spectral import ConditionNumber, SpectralNorm
from sonde.metrics.stats import (
    AbsMean,
    Histogram,
    Max,
    Mean,
    Min,
    NonfiniteFrac,
    Norm,
    Std,
    TensorStats,
    UpdateRatio,
    Var,
    ZeroFrac,
)
from sonde.metrics.tasks import ClusterMI, ProbeF1
from sonde.metrics.test_accuracy import TestAccuracy
from sonde.metrics.training import Loss, TrainAccuracy

__all__ = [
    "CKA",
    "DEFAULT_METRICS",
    "SVCCA",
    "AbsMean",
    "Alerts",
    "CKAMatrix",
    "Capture",
    "ClusterMI",
    "ConditionNumber",
    "Histogram",
    "Loss",
    "Max",
    "Mean",
    "Metric",
    "Min",
    "NonfiniteFrac",
    "Norm",
    "ProbeF1",
    "Saturation",
    "ServerMetric",
    "SpectralNorm",
    "Std",
    "TensorStats",
    "TestAccuracy",
    "TrainAccuracy",
    "UpdateRatio",
    "Var",
    "ZeroFrac",
    "registry",
    "resolve_metrics",
]


def __getattr__(name: str) -> object:
    # ServerMetric ships tensors through sonde.wire (safetensors, httpx); importing it lazily keeps
    # those out of `import sonde` for the probes that never use a server.
    if name == "ServerMetric":
        from sonde.metrics.server import ServerMetric

        return ServerMetric
    raise AttributeError(f"module 'sonde.metrics' has no attribute {name!r}")
