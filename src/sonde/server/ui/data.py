"""What the dashboard reads from the store, and the choices it offers from what is there.

The dashboard never knows a metric by heart: the topics and metrics it offers come from
:meth:`Store.available`, so metrics added later (saturation, spectral norms, alerts) show up in
the selectors on their own. Every chart reads a downsampled query (``Store.series``,
``Store.heatmap``, ``Store.histograms``), never a run's raw Records.

Example:
    >>> choices = Choices.from_available([("train", "activations", "zero_frac"), ("train", "loss", "loss")])
    >>> choices.heatmap_default()
    ('activations', 'zero_frac')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sonde.topics import SCHEDULE_TOPIC, STEP_TOPICS, TOPICS

__all__ = [
    "ARRAY_METRICS",
    "LOG_METRICS",
    "NETWORK_TOPICS",
    "Choices",
    "heatmap_budget",
    "pick_changing",
    "pick_layers",
    "splice",
    "splice_heatmap",
]

#: Topics recorded once per step for the whole network (layer ``""``), not per layer.
NETWORK_TOPICS = frozenset(STEP_TOPICS)
#: Metrics whose values are arrays: drawn as histograms over time, never as heatmap cells or lines.
ARRAY_METRICS = frozenset({"histogram", "histogram_edges"})
#: Metrics that span orders of magnitude: their heatmaps and charts start on a log scale.
LOG_METRICS = frozenset({"update_ratio", "norm", "std", "var", "abs_mean", "spectral_norm", "condition_number"})
#: Metrics that are events, listed in the alerts panel.
ALERT_METRIC = "alert"
#: Heatmap defaults in order of preference: a dead layer (zero_frac) or a runaway update shows at a glance.
_HEATMAP_PREFERENCE = (
    ("activations", "zero_frac"),
    ("weight_updates", "update_ratio"),
    ("activations", "std"),
    ("weights", "norm"),
)
_HISTOGRAM_PREFERENCE = ("weights", "weight_grads", "activations", "output_grads")
#: The most cells one overview heatmap sends to the browser (rows × columns).
_HEATMAP_CELLS = 30_000


@dataclass
class Choices:
    """The (phase, topic, metric) triples of one run, sorted into what each view can show."""

    phases: list[str] = field(default_factory=list)
    layer_metrics: dict[str, list[str]] = field(default_factory=dict)  # topic -> scalar metrics, per layer
    network_metrics: dict[str, list[str]] = field(default_factory=dict)  # topic -> scalar metrics, layer ""
    histogram_topics: list[str] = field(default_factory=list)
    has_alerts: bool = False
    has_schedule: bool = False  # the overhead budget recorded its intervals

    @classmethod
    def from_available(cls, triples: Iterable[Sequence[str]]) -> Choices:
        """Sort ``Store.available(run)`` into the views' choices.

        Example:
            >>> Choices.from_available([("train", "weights", "histogram")]).histogram_topics
            ['weights']
        """
        phases: set[str] = set()
        layer: dict[str, set[str]] = {}
        network: dict[str, set[str]] = {}
        hist: set[str] = set()
        alerts = schedule = False
        for phase, topic, metric in triples:
            phases.add(phase)
            if metric == ALERT_METRIC:
                alerts = True
            elif topic == SCHEDULE_TOPIC:
                schedule = True  # how often the budget records: the run page's header says it
            elif metric == "histogram":
                hist.add(topic)
            elif metric not in ARRAY_METRICS:
                (network if topic in NETWORK_TOPICS else layer).setdefault(topic, set()).add(metric)
        order = {"train": 0, "eval": 1}
        return cls(
            phases=sorted(phases, key=lambda p: (order.get(p, 2), p)),
            layer_metrics={t: sorted(m) for t, m in sorted(layer.items(), key=lambda kv: _topic_key(kv[0]))},
            network_metrics={t: sorted(m) for t, m in sorted(network.items(), key=lambda kv: _topic_key(kv[0]))},
            histogram_topics=sorted(hist, key=_topic_key),
            has_alerts=alerts,
            has_schedule=schedule,
        )

    def heatmap_default(self) -> tuple[str, str] | None:
        """The overview's first colouring: dead units if measured, else runaway updates, else anything."""
        for topic, metric in _HEATMAP_PREFERENCE:
            if metric in self.layer_metrics.get(topic, ()):
                return topic, metric
        for topic, metrics in self.layer_metrics.items():
            if metrics:
                return topic, metrics[0]
        return None

    def histogram_default(self) -> str | None:
        """The topic shown first as a histogram over time (weights when recorded)."""
        for topic in _HISTOGRAM_PREFERENCE:
            if topic in self.histogram_topics:
                return topic
        return self.histogram_topics[0] if self.histogram_topics else None

    def all_series(self) -> list[tuple[str, str]]:
        """Every scalar (topic, metric), network-wide ones first, for the comparison page."""
        both = {**self.network_metrics, **self.layer_metrics}
        return [(t, m) for t, metrics in both.items() for m in metrics]


def _topic_key(topic: str) -> tuple[int, str]:
    return (TOPICS.index(topic), topic) if topic in TOPICS else (len(TOPICS), topic)


def heatmap_budget(n_layers: int) -> int:
    """How many step columns the overview asks for so that ``rows × columns`` stays drawable.

    Example:
        >>> heatmap_budget(10), heatmap_budget(200)
        (400, 150)
    """
    return max(50, min(400, _HEATMAP_CELLS // max(n_layers, 1)))


def pick_layers(layers: Sequence[str], limit: int = 4) -> list[str]:
    """A spread of layers to overlay first: the first, the last and evenly spaced ones between.

    Example:
        >>> pick_layers(["a", "b", "c", "d", "e", "f", "g"], 3)
        ['a', 'd', 'g']
    """
    if len(layers) <= limit:
        return list(layers)
    if limit == 1:
        return [layers[0]]
    idx = sorted({round(i * (len(layers) - 1) / (limit - 1)) for i in range(limit)})
    return [layers[i] for i in idx]


def pick_changing(heatmap: Mapping[str, Any], limit: int = 4) -> list[str]:
    """The layers whose values moved the most over the run (range of their heatmap row), in forward order.

    The overview's first line chart shows these: a layer whose units die or whose updates
    explode is the one that moved.

    Example:
        >>> pick_changing({"layers": ["a", "b", "c"], "values": [[0.5, 0.5], [0.1, 0.9], [0.2, 0.4]]}, 2)
        ['b', 'c']
    """
    spans: list[tuple[float, int, str]] = []
    for i, (layer, row) in enumerate(zip(heatmap.get("layers", []), heatmap.get("values", []), strict=False)):
        values = [v for v in finite(row) if v is not None]
        if values:
            spans.append((max(values) - min(values), i, str(layer)))
    top = sorted(spans, key=lambda t: (-t[0], t[1]))[:limit]
    return [layer for _, _, layer in sorted(top, key=lambda t: t[1])]


def splice(coarse: Mapping[str, Sequence[Any]], fine: Mapping[str, Sequence[Any]], start: int, end: int | None
           ) -> dict[str, list[Any]]:
    """A whole-run series with the steps ``start..end`` replaced by a finer query of just that window.

    ``end=None`` is open: everything from ``start`` on comes from ``fine``.

    The chart keeps its full step axis (so its zoom stays where the user put it) while the
    zoomed range shows full detail.

    Example:
        >>> coarse = {"step": [0, 50, 100], "value": [1.0, 2.0, 3.0]}
        >>> splice(coarse, {"step": [40, 41], "value": [5.0, 6.0]}, 40, 60)["step"]
        [0, 40, 41, 100]
    """
    keys = [k for k in ("step", "value", "min", "max") if k in coarse and k in fine]
    out: dict[str, list[Any]] = {k: [] for k in keys}
    steps = list(coarse.get("step", []))
    before = [i for i, s in enumerate(steps) if s < start]
    after = [] if end is None else [i for i, s in enumerate(steps) if s > end]
    for k in keys:
        column = list(coarse[k])
        out[k] = [column[i] for i in before] + list(fine[k]) + [column[i] for i in after]
    return out


def splice_heatmap(coarse: Mapping[str, Sequence[Any]], fine: Mapping[str, Sequence[Any]], start: int,
                   end: int | None) -> dict[str, list[Any]]:
    """A whole-run heatmap with the step columns ``start..end`` replaced by a finer query of just that range.

    ``end=None`` is open: every column from ``start`` on comes from ``fine``. Rows follow the
    coarse heatmap's layer order (a layer only one of the two has is added after, its other
    cells None), so the overview keeps every step of the run while the zoomed range is dense.

    Example:
        >>> coarse = {"layers": ["a"], "steps": [0, 50, 100], "values": [[1.0, 2.0, 3.0]]}
        >>> out = splice_heatmap(coarse, {"layers": ["a"], "steps": [40, 41], "values": [[5.0, 6.0]]}, 40, 60)
        >>> out["steps"], out["values"]
        ([0, 40, 41, 100], [[1.0, 5.0, 6.0, 3.0]])
    """
    steps = list(coarse.get("steps", []))
    before = [i for i, s in enumerate(steps) if s < start]
    after = [] if end is None else [i for i, s in enumerate(steps) if s > end]
    fine_steps = list(fine.get("steps", []))
    layers = list(coarse.get("layers", []))
    layers += [name for name in fine.get("layers", []) if name not in layers]
    coarse_rows = dict(zip(coarse.get("layers", []), coarse.get("values", []), strict=False))
    fine_rows = dict(zip(fine.get("layers", []), fine.get("values", []), strict=False))
    values: list[list[Any]] = []
    for name in layers:
        outer = list(coarse_rows.get(name) or [None] * len(steps))
        inner = list(fine_rows.get(name) or [None] * len(fine_steps))
        values.append([outer[i] for i in before] + inner + [outer[i] for i in after])
    return {"layers": layers, "steps": [steps[i] for i in before] + fine_steps + [steps[i] for i in after],
            "values": values}


def finite(values: Iterable[Any]) -> list[float | None]:
    """Floats with NaN, ±Inf and None as None (JSON null): ECharts leaves a gap there."""
    out: list[float | None] = []
    for v in values:
        f = None if v is None else float(v)
        out.append(f if f is not None and math.isfinite(f) else None)
    return out
