"""ECharts options for the dashboard's three kinds of plot, built from the store's query results.

Pure functions from query dicts to option dicts: no NiceGUI, no store, so they are tested on
their own. Keys that start with ``:`` hold JavaScript (NiceGUI evaluates them in the browser),
used for tooltips and log-scale labels.

Example:
    >>> opts = heatmap_options({"layers": ["fc1"], "steps": [0, 1], "values": [[0.5, 0.25]]}, title="zero_frac")
    >>> opts["series"][0]["data"]
    [[0, 0, 0.5], [1, 0, 0.25]]
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sonde.server.ui.data import finite
from sonde.server.ui.markup import js_texts

__all__ = ["PALETTE", "VIRIDIS", "heatmap_options", "histogram_options", "lines_options"]

#: Perceptually uniform, colour-blind safe: dark is low, yellow is high.
VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]
#: Line colours (Tableau 10).
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
_MISSING = "#d62728"
_ZOOM = [{"type": "inside", "xAxisIndex": 0}, {"type": "slider", "xAxisIndex": 0, "height": 16, "bottom": 6}]
# Axis numbers: plain for ordinary magnitudes, scientific for tiny or huge ones.
_NUMBER = ("(v) => { const a = Math.abs(v); "
           "return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(1) : String(+v.toPrecision(4)); }")
_FONT = {"fontFamily": "Inter, system-ui, sans-serif"}
# Tooltip and label formatters: log-scale values are log10 of the real value.
_EXP_LABEL = "(v) => (Math.abs(v) < 1e-9 ? '1' : '1e' + v.toFixed(1))"


def _heat_tip(layers: Sequence[str], steps: Sequence[Any], log: bool) -> str:
    # The row and column names travel once, inside the formatter, not in each of ~40,000 cells;
    # escaped, since the formatter's string is HTML (a layer may be named '<img onerror=...>').
    value = "Math.pow(10, p.data[2])" if log else "Number(p.data[2])"
    return (
        f"(p) => {{ const L = {js_texts(layers)}, S = {js_texts(steps)}; "
        "const where = `layer <b>${L[p.data[1]]}</b><br/>step ${S[p.data[0]]}`; "
        "return p.seriesIndex === 1 ? `${p.marker} ${where}: NaN / Inf or missing` "
        f": `${{p.marker}} ${{where}}: <b>${{{value}.toPrecision(4)}}</b>`; }}"
    )


def _round(v: float) -> float:
    """Five significant digits: what a colour can show, at a third of the JSON."""
    return float(f"{v:.5g}")


def _log10(v: float | None) -> float | None:
    return math.log10(v) if v is not None and v > 0 else None


def _base(title: str) -> dict[str, Any]:
    return {
        "animation": False,
        "textStyle": dict(_FONT),
        "title": {"text": title, "left": 8, "top": 4, "textStyle": {"fontSize": 13, "fontWeight": 600}},
        "toolbox": {"right": 12, "feature": {"saveAsImage": {"title": "save PNG"}, "restore": {"title": "reset zoom"}}},
    }


def _zoom_to(steps: Sequence[Any], window: tuple[int, int | None] | None) -> dict[str, Any]:
    """The dataZoom range that shows the columns of ``window`` (column indices), or all columns."""
    if window is None:
        return {"start": 0, "end": 100}
    first, last = window
    inside = [i for i, s in enumerate(steps) if int(s) >= first and (last is None or int(s) <= last)]
    if not inside:
        return {"start": 0, "end": 100}
    return {"startValue": inside[0], "endValue": inside[-1]}


def heatmap_options(
    data: Mapping[str, Any], *, title: str, log: bool = False, labels: Mapping[str, str] | None = None,
    window: tuple[int, int | None] | None = None,
) -> dict[str, Any]:
    """The network overview: one row per layer (forward order, top to bottom), one column per step.

    Cells with no finite value in a row that has values elsewhere (a layer that went NaN) are
    painted red, so an exploding layer stands out even where the colour scale cannot show it.
    Rows with no value at all (a ReLU has no weights) are left out.

    Args:
        data: ``Store.heatmap`` result: ``layers``, ``steps``, ``values`` (one list per layer).
        title: chart title.
        log: colour by log10 of the value (non-positive values count as missing).
        labels: row label per layer name (e.g. ``"3 · ReLU"``); the name itself otherwise.
        window: the steps (first, last; last None for the newest) the user zoomed into: the zoom
            is set to exactly those columns. A zoomed heatmap is re-queried with more columns in
            its range (see ``Source.heatmap``), so the zoom is pinned to steps, not percentages.

    Example:
        >>> data = {"layers": ["fc1"], "steps": [0, 40, 41, 100], "values": [[0.5, 0.25, 0.3, 0.1]]}
        >>> heatmap_options(data, title="zero_frac", window=(40, 60))["dataZoom"][0]["startValue"]
        1
    """
    labels = labels or {}
    steps = list(data.get("steps", []))
    rows: list[tuple[str, list[float | None]]] = []
    for layer, row in zip(data.get("layers", []), data.get("values", []), strict=False):
        clean = finite(row)
        if log:
            clean = [_log10(v) for v in clean]
        if any(v is not None for v in clean):
            rows.append((str(layer), clean))
    cells: list[list[Any]] = []
    missing: list[list[Any]] = []
    for y, (_, row) in enumerate(rows):
        for x, v in enumerate(row):
            if v is None:
                missing.append([x, y, 0])
            else:
                cells.append([x, y, _round(v)])
    values = [c[2] for c in cells]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    names = [labels.get(layer, layer) for layer, _ in rows]
    longest = max((len(n) for n in names), default=4)
    visual: dict[str, Any] = {
        "type": "continuous", "min": low, "max": high, "calculable": True, "orient": "vertical",
        "right": 14, "top": 52, "itemHeight": 120, "itemWidth": 14, "dimension": 2, "seriesIndex": 0,
        "inRange": {"color": VIRIDIS}, "precision": 3,
    }
    if log:
        visual[":formatter"] = _EXP_LABEL
    options = _base(title)
    options.update({
        "grid": {"left": min(12 + 7 * longest, 260), "right": 100, "top": 36, "bottom": 64},
        "tooltip": {"position": "top", ":formatter": _heat_tip(names, steps, log)},
        "xAxis": {"type": "category", "data": [str(s) for s in steps], "name": "step", "nameLocation": "middle",
                  "nameGap": 26, "splitArea": {"show": False}},
        "yAxis": {"type": "category", "data": names, "inverse": True,
                  "axisLabel": {"fontSize": 11}},
        "visualMap": visual,
        "dataZoom": [{**zoom, **_zoom_to(steps, window)} for zoom in copy.deepcopy(_ZOOM)],
        "series": [
            {"name": title, "type": "heatmap", "data": cells, "progressive": 0, "emphasis": {"disabled": True}},
            {"name": "NaN / Inf", "type": "heatmap", "data": missing, "itemStyle": {"color": _MISSING},
             "progressive": 0, "emphasis": {"disabled": True}},
        ],
    })
    return options


def lines_options(
    series: Sequence[tuple[str, Mapping[str, Any]]], *, title: str, log: bool = False, y_name: str = ""
) -> dict[str, Any]:
    """Several downsampled series overlaid, each with its per-bucket min..max as a faint band.

    Args:
        series: ``(legend name, Store.series result)`` pairs; a result has ``step``, ``value``
            and optionally ``min``/``max`` per bucket.
        title: chart title.
        log: logarithmic y axis (non-positive values become gaps).
        y_name: y axis label.

    Example:
        >>> opts = lines_options([("fc1", {"step": [0, 1], "value": [2.0, 1.0]})], title="norm")
        >>> opts["series"][0]["data"]
        [[0, 2.0], [1, 1.0]]
    """
    out: list[dict[str, Any]] = []
    legend: list[str] = []
    for i, (name, data) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        steps = list(data.get("step", []))
        value = finite(data.get("value", []))
        if log:
            value = [v if v is not None and v > 0 else None for v in value]
        legend.append(name)
        out.append({
            "name": name, "type": "line", "showSymbol": len(steps) < 40, "symbolSize": 4, "sampling": "none",
            "connectNulls": False, "color": color, "lineStyle": {"width": 1.6},
            "data": [[s, v] for s, v in zip(steps, value, strict=False)],
        })
        lo, hi = finite(data.get("min", [])), finite(data.get("max", []))
        if len(lo) == len(steps) and len(hi) == len(steps) and any(a != b for a, b in zip(lo, hi, strict=False)):
            # The envelope of each bucket: where one point stands for many steps, a spike stays visible.
            band = [[s, a, b] for s, a, b in zip(steps, lo, hi, strict=False)
                    if a is not None and b is not None and (not log or a > 0)]
            out.append({
                "name": name, "type": "custom", "silent": True, "z": 1, "data": band, "color": color,
                "encode": {"x": 0, "y": [1, 2]}, "tooltip": {"show": False},
                ":renderItem": _BAND_RENDER,
            })
    options = _base(title)
    options.update({
        "color": PALETTE,
        "grid": {"left": 64, "right": 24, "top": 64 if len(legend) > 3 else 48, "bottom": 56},
        "legend": {"type": "scroll", "data": legend, "top": 26, "left": 8, "right": 80},
        "tooltip": {"trigger": "axis", "axisPointer": {"type": "line"}, "valueFormatter": None,
                    ":valueFormatter": "(v) => v == null ? '–' : Number(v).toPrecision(4)"},
        "xAxis": {"type": "value", "name": "step", "nameLocation": "middle", "nameGap": 26, "min": "dataMin",
                  "max": "dataMax"},
        "yAxis": {"type": "log" if log else "value", "name": y_name, "nameTextStyle": {"align": "left"},
                  "scale": True, "axisLabel": {":formatter": _NUMBER}},
        "dataZoom": copy.deepcopy(_ZOOM),
        "series": out,
    })
    del options["tooltip"]["valueFormatter"]
    return options


# A filled polygon between the min and max of consecutive buckets (one per chart series).
_BAND_RENDER = """(params, api) => {
  if (params.context.rendered) return;
  params.context.rendered = true;
  const n = params.dataInsideLength;
  const top = [], bottom = [];
  for (let i = 0; i < params.dataInsideLength; i++) {
    top.push(api.coord([api.value(0, i), api.value(2, i)]));
    bottom.push(api.coord([api.value(0, i), api.value(1, i)]));
  }
  if (n === 0) return;
  return {type: 'polygon', shape: {points: top.concat(bottom.reverse())},
          style: {fill: api.visual('color'), opacity: 0.18}, silent: true};
}"""


def histogram_options(data: Mapping[str, Any], *, title: str) -> dict[str, Any]:
    """A distribution over training: steps as columns, histogram bins as rows, colour = log count.

    Args:
        data: ``Store.histograms`` result: ``steps``, ``edges`` (bins + 1), ``counts`` (one list per step).
        title: chart title.

    Example:
        >>> opts = histogram_options({"steps": [0], "edges": [0.0, 1.0, 2.0], "counts": [[9.0, 0.0]]}, title="w")
        >>> [cell[:2] + cell[3:] for cell in opts["series"][0]["data"]]
        [[0, 0, 100.0], [0, 1, 0.0]]
    """
    steps = list(data.get("steps", []))
    edges = [float(e) for e in data.get("edges", [])]
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    cells: list[list[Any]] = []
    for x, counts in enumerate(data.get("counts", [])):
        total = sum(c for c in counts if c is not None and math.isfinite(c)) or 1.0
        for y, c in enumerate(counts[: len(centres)]):
            if c is not None and math.isfinite(c):
                cells.append([x, y, _round(math.log10(1.0 + max(c, 0.0))), round(100.0 * c / total, 2)])
    high = max((c[2] for c in cells), default=1.0)
    options = _base(title)
    options.update({
        "grid": {"left": 72, "right": 24, "top": 36, "bottom": 64},
        "tooltip": {"position": "top",
                    ":formatter": f"(p) => {{ const E = {json.dumps([float(f'{e:.4g}') for e in edges])}; "
                                  "return `step ${p.name}<br/>values in [${E[p.data[1]]}, ${E[p.data[1] + 1]}): "
                                  "${p.data[3]}%`; }"},
        "xAxis": {"type": "category", "data": [str(s) for s in steps], "name": "step", "nameLocation": "middle",
                  "nameGap": 26},
        "yAxis": {"type": "category", "data": [f"{c:.3g}" for c in centres],
                  "axisLabel": {"fontSize": 10, "interval": max(0, len(centres) // 8 - 1)}},
        "visualMap": {"show": False, "min": 0, "max": high, "dimension": 2, "inRange": {"color": VIRIDIS}},
        "dataZoom": copy.deepcopy(_ZOOM),
        "series": [{"name": title, "type": "heatmap", "progressive": 0, "emphasis": {"disabled": True},
                    "data": cells}],
    })
    # ``p.name`` of a heatmap cell is its x category: the step.
    return options
