"""ECharts options for the layer × layer similarity (CKA) matrix, from :meth:`Store.matrix` results.

Pure functions, no NiceGUI and no store, like :mod:`sonde.server.ui.charts`: the run page's
"Layer similarity (CKA)" panel (:mod:`sonde.server.ui.panels.similarity`) draws what these return.

The matrix is square: layer ``a`` (row, top to bottom in forward order) against layer ``b``
(column, left to right in the same order), coloured on a fixed 0…1 scale so that two steps
compare by eye. A pair with no value (a layer skipped at that pass) is a grey cell.

Example:
    >>> opts = matrix_options({"layers": ["fc1", "fc2"], "step": 5, "values": [[1.0, 0.5], [0.5, 1.0]]})
    >>> opts["series"][0]["data"]
    [[0, 0, 1.0], [1, 0, 0.5], [0, 1, 0.5], [1, 1, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sonde.server.ui.charts import VIRIDIS
from sonde.server.ui.data import finite
from sonde.server.ui.markup import js_texts

__all__ = ["CKA_PREFIX", "CKA_TOPIC", "matrix_options", "matrix_phases", "matrix_size", "matrix_step"]

#: Metric name prefix of the CKA matrix's Records (``cka_matrix:<other layer>``).
CKA_PREFIX = "cka_matrix:"
#: The topic the CKA matrix is recorded under.
CKA_TOPIC = "activations"
_MISSING = "#c8c8c8"
_FONT = {"fontFamily": "Inter, system-ui, sans-serif"}


def matrix_phases(triples: Iterable[Sequence[str]], topic: str = CKA_TOPIC, prefix: str = CKA_PREFIX) -> list[str]:
    """The phases in which a run recorded the pairwise family ``prefix*`` of ``topic`` (train first).

    ``triples`` is :meth:`Store.available`'s answer; an empty list means "no matrix: hide the panel".

    Example:
        >>> matrix_phases([("train", "activations", "cka_matrix:fc1"), ("train", "loss", "loss")])
        ['train']
        >>> matrix_phases([("train", "activations", "zero_frac")])
        []
    """
    found = {p for p, t, m in triples if t == topic and m.startswith(prefix) and len(m) > len(prefix)}
    order = {"train": 0, "eval": 1}
    return sorted(found, key=lambda p: (order.get(p, 2), p))


def matrix_step(steps: Sequence[int], shown: int | None, wanted: int | None) -> int | None:
    """The step the panel should show next: ``wanted`` while it is recorded, else the latest.

    ``wanted`` is None while the user follows the latest step (the default); a live run then
    moves on to each new step as it appears. ``shown`` is unused for the choice but kept so a
    caller can tell whether the view changed (``matrix_step(...) != shown``).

    Example:
        >>> matrix_step([0, 100, 200], 100, None), matrix_step([0, 100, 200], 200, 100)
        (200, 100)
        >>> matrix_step([], None, None) is None
        True
    """
    if not steps:
        return None
    return wanted if wanted is not None and wanted in steps else int(steps[-1])


def matrix_options(
    data: Mapping[str, Any], *, title: str = "CKA", labels: Mapping[str, str] | None = None,
    low: float = 0.0, high: float = 1.0,
) -> dict[str, Any]:
    """A square heatmap of a layer × layer matrix: rows and columns in forward order, colour ``low…high``.

    Args:
        data: :meth:`Store.matrix` result: ``layers`` (both axes), ``values`` (row-major, None
            where missing) and ``step``.
        title: chart title (the step is appended).
        labels: axis label per layer name (e.g. ``"3 · ReLU"``); the name itself otherwise.
        low, high: the fixed colour range (CKA lies in 0…1).

    Returns:
        ECharts options; series 0 holds ``[column, row, value]`` for every finite cell, series 1
        ``[column, row, 0]`` for every missing one.
    """
    labels = labels or {}
    layers = [str(layer) for layer in data.get("layers", [])]
    names = [labels.get(layer, layer) for layer in layers]
    cells: list[list[Any]] = []
    missing: list[list[Any]] = []
    for y, row in enumerate(data.get("values", [])):
        for x, v in enumerate(finite(row)):
            if v is None:
                missing.append([x, y, 0])
            else:
                cells.append([x, y, float(f"{v:.5g}")])
    step = data.get("step")
    longest = max((len(n) for n in names), default=4)
    margin = min(14 + 7 * longest, 220)
    tip = (f"(p) => {{ const L = {js_texts(names)}; "  # escaped: the tooltip is HTML
           "const where = `<b>${L[p.data[1]]}</b> vs <b>${L[p.data[0]]}</b>`; "
           "return p.seriesIndex === 1 ? `${where}: not recorded` "
           ": `${where}: <b>${Number(p.data[2]).toFixed(4)}</b>`; }")
    axis: dict[str, Any] = {"type": "category", "data": names, "splitArea": {"show": False},
            "axisLabel": {"fontSize": 11, "interval": 0 if len(names) <= 40 else "auto"}}
    return {
        "animation": False,
        "textStyle": dict(_FONT),
        "title": {"text": title if step is None else f"{title} · step {step}", "left": 8, "top": 4,
                  "textStyle": {"fontSize": 13, "fontWeight": 600}},
        "toolbox": {"right": 12, "feature": {"saveAsImage": {"title": "save PNG"}}},
        "tooltip": {"position": "top", ":formatter": tip},
        # Square cells: the chart's height fixes the grid; ``aspectScale`` has no effect on a grid,
        # so the panel sizes the chart to ``margin + rows × cell`` in both directions.
        "grid": {"left": margin, "right": 96, "top": 40, "bottom": margin},
        "xAxis": {**axis, "axisLabel": {**axis["axisLabel"], "rotate": 45}, "position": "bottom"},
        "yAxis": {**axis, "inverse": True},
        "visualMap": {
            "type": "continuous", "min": low, "max": high, "calculable": True, "orient": "vertical",
            "right": 14, "top": 52, "itemHeight": 140, "itemWidth": 14, "dimension": 2, "seriesIndex": 0,
            "inRange": {"color": VIRIDIS}, "precision": 2,
        },
        "series": [
            {"name": title, "type": "heatmap", "data": cells, "progressive": 0, "emphasis": {"disabled": True},
             "label": {"show": len(names) <= 12, "fontSize": 10, ":formatter": "(p) => p.data[2].toFixed(2)"}},
            {"name": "not recorded", "type": "heatmap", "data": missing, "itemStyle": {"color": _MISSING},
             "progressive": 0, "emphasis": {"disabled": True}},
        ],
    }


def matrix_size(n_layers: int, names: Sequence[str] = ()) -> tuple[int, int]:
    """Chart width and height in pixels that make the cells square (about 28 px, 10…48 px).

    Example:
        >>> matrix_size(5, ["fc1"])
        (371, 315)
    """
    longest = max((len(n) for n in names), default=4)
    margin = min(14 + 7 * longest, 220)
    cell = max(10, min(48, 560 // max(n_layers, 1)))
    side = cell * max(n_layers, 1)
    return margin + side + 96, 40 + side + margin

