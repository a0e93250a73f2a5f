"""Tensor statistics of any topic, exactly as docs/metrics.md#tensor-statistics defines them.

All nine scalar statistics share one fused device-side reduction per tensor
(:func:`sonde.functional.summarize`), memoised per step, so asking for all of them costs
about one pass more than asking for one. Variance is the population variance (ddof=0).

Example:
    >>> import torch
    >>> from sonde.bus import Bus
    >>> bus = Bus("run", [Std()], topics=["activations"], schedule=lambda step: True)
    >>> bus.publish("fc", "activations", torch.tensor([1.0, 3.0]), phase="train", step=0)
    >>> [(r.metric, r.value) for r in bus.flush("train", 0)]
    [('std', 1.0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sonde import functional as F
from sonde.errors import ConfigError
from sonde.metrics.base import Capture, Metric
from sonde.topics import TENSOR_TOPICS, UPDATE_OF

__all__ = [
    "AbsMean",
    "Histogram",
    "Max",
    "Mean",
    "Min",
    "NonfiniteFrac",
    "Norm",
    "Std",
    "TensorStats",
    "UpdateRatio",
    "Var",
    "ZeroFrac",
]

STAT_TOPICS = (*TENSOR_TOPICS, "outputs")
STATS = ("mean", "std", "var", "min", "max", "abs_mean", "norm", "zero_frac", "nonfinite_frac")


class TensorStats(Metric):
    """Any subset of the nine tensor statistics, from one shared summary per tensor.

    Selecting ``mean``, ``std``, ... by name gives one of the one-statistic subclasses below;
    the probe combines them into a single ``TensorStats`` per layer and topic, so the cost is
    one fused reduction and one host-side computation whatever the subset.

    Args:
        stats: names among ``mean std var min max abs_mean norm zero_frac nonfinite_frac``.
    """

    name = "stats"
    topics = STAT_TOPICS
    default_stats: ClassVar[tuple[str, ...]] = STATS

    def __init__(self, stats: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        chosen = tuple(self.default_stats if stats is None else stats)
        unknown = [s for s in chosen if s not in STATS]
        if unknown:
            raise ConfigError(f"unknown statistic(s) {unknown}; TensorStats computes {', '.join(STATS)}")
        self.stats = chosen
        self.add_state("summary", default=None, reduce=F.merge_summaries)

    def emits(self) -> tuple[str, ...]:
        return self.stats

    def combine(self, other: Metric) -> Metric | None:
        if isinstance(other, TensorStats) and other.schedule is self.schedule:
            merged = TensorStats(stats=[*self.stats, *(s for s in other.stats if s not in self.stats)])
            merged.schedule = self.schedule
            return merged
        return None

    def update(self, capture: Capture) -> None:
        self.stage("summary", capture.summary())

    def absorb(self, name: str, value: Any) -> None:
        if name == "summary" and value is not None and len(value) != len(F.EMPTY_SUMMARY):
            value = F.finish_summary(value)  # a raw partial fresh from the device
        super().absorb(name, value)

    def compute(self) -> dict[str, Any]:
        summary = self.state["summary"]
        if summary is None or summary[0] == 0:
            return {}  # empty batches record nothing rather than a made-up number
        stats = F.summary_stats(summary)
        return {name: stats[name] for name in self.stats}


class Mean(TensorStats):
    """Mean of all elements."""

    name = "mean"
    default_stats = ("mean",)


class Std(TensorStats):
    """Population standard deviation (ddof=0) of all elements."""

    name = "std"
    default_stats = ("std",)


class Var(TensorStats):
    """Population variance (ddof=0) of all elements; Ikkuna used the unbiased one."""

    name = "var"
    default_stats = ("var",)


class Min(TensorStats):
    """Smallest element (NaN if any element is NaN, as numpy's ``min``)."""

    name = "min"
    default_stats = ("min",)


class Max(TensorStats):
    """Largest element (NaN if any element is NaN)."""

    name = "max"
    default_stats = ("max",)


class AbsMean(TensorStats):
    """Mean of absolute values."""

    name = "abs_mean"
    default_stats = ("abs_mean",)


class Norm(TensorStats):
    """L2 norm of all elements."""

    name = "norm"
    default_stats = ("norm",)


class ZeroFrac(TensorStats):
    """Fraction of elements exactly zero: dead ReLU units, pruned weights."""

    name = "zero_frac"
    default_stats = ("zero_frac",)


class NonfiniteFrac(TensorStats):
    """Fraction of elements that are NaN or ±Inf."""

    name = "nonfinite_frac"
    default_stats = ("nonfinite_frac",)


class Histogram(Metric):
    """Counts per bin over bin edges fixed at the first recorded step.

    The edges span the min..max of the first captured tensor of the first recorded step whose
    values are finite and not all equal (a zero-initialised bias waits for its first update).
    Later values outside the edges count in the end bins; NaN is not counted. Emits
    ``histogram`` (counts) every recorded step and ``histogram_edges`` (bins + 1 values) at
    the step where the edges were fixed.

    Args:
        bins: number of bins (default 64; at most 4096).
    """

    name = "histogram"
    outputs = ("histogram", "histogram_edges")
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"bins": (1, 4096)}
    topics = STAT_TOPICS

    def __init__(self, bins: int = 64, **kwargs: Any) -> None:
        self.check_settings(bins=bins)
        super().__init__(**kwargs)
        self.bins = int(bins)
        self.edges: np.ndarray | None = None
        self._range: tuple[float, float] | None = None  # (edges[0], edges[-1]) as floats, once fixed
        self._device_range: tuple[torch.Tensor, torch.Tensor] | None = None
        self._announce = False
        self.add_state("counts", default=None, reduce="sum")
        self.add_state("range", default=None, reduce=lambda first, _later: first)

    def prepare(self, capture: Capture) -> None:
        if self._range is not None:
            capture.want_histogram(*self._range, self.bins)

    def update(self, capture: Capture) -> None:
        if capture.numel() == 0:
            return  # empty tensor
        if self._range is not None:
            self.stage("counts", capture.histogram(*self._range, self.bins))
            return
        raw = capture.summary()
        if self._device_range is None:
            self._device_range = (torch.as_tensor(raw[4]), torch.as_tensor(raw[5]))
            self.stage("range", torch.stack(self._device_range))
        lo_t, hi_t = self._device_range
        if capture.tensor.device.type == "cpu":
            lo, hi = float(lo_t), float(hi_t)
            if F.histogram_edges(lo, hi, self.bins) is None:
                return  # a constant or non-finite first step: no counts until the edges can be fixed
            self.stage("counts", capture.histogram(lo, hi, self.bins))
            return
        self.stage("counts", capture.histogram(lo_t, hi_t, self.bins))

    def compute(self) -> dict[str, Any]:
        if self.edges is None:
            value_range = self.state["range"]
            edges = None if value_range is None else F.histogram_edges(value_range[0], value_range[1], self.bins)
            if edges is None:
                self._device_range = None  # try again at the next recorded step
                return {}
            self.edges = edges
            self._range = (float(edges[0]), float(edges[-1]))
            self._announce = True
        counts = self.state["counts"]
        if counts is None:
            return {}
        out: dict[str, Any] = {"histogram": np.asarray(counts, dtype=np.float64)}
        if self._announce:
            out["histogram_edges"] = self.edges
            self._announce = False
        return out

    def reset(self) -> None:
        super().reset()
        # The edges and the device range are configuration fixed once, not per-step state.


class UpdateRatio(Metric):
    """``‖w_after − w_before‖₂ / ‖w_before‖₂`` per layer and step, from two norms' Records.

    A metric of Records rather than tensors: it reads the ``norm`` of ``weight_updates`` and
    of ``weights`` (or the bias pair) recorded at the same step and layer. A healthy SGD run
    sits near 1e-3.
    """

    name = "update_ratio"
    topics = tuple(UPDATE_OF)
    requires = ("norm",)
    reads_topics: ClassVar[dict[str, str]] = UPDATE_OF
    derived: ClassVar[bool] = True

    def update(self, capture: Capture) -> None:
        pass  # nothing to stage: the value is derived from the step's norm Records

    def derive(self, values: dict[tuple[str, str, str], Any], layer: str, topic: str) -> dict[str, Any]:
        update_norm = values.get((layer, topic, "norm"))
        weight_norm = values.get((layer, UPDATE_OF[topic], "norm"))
        if update_norm is None or weight_norm is None:
            return {}
        return {"update_ratio": update_norm / weight_norm if weight_norm else float("nan")}

    def compute(self) -> dict[str, Any]:
        return {}
