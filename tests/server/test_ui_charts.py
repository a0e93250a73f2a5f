"""The dashboard's choices and chart options, checked against numpy on the same inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sonde.server.ui.charts import heatmap_options, histogram_options, lines_options
from sonde.server.ui.data import Choices, heatmap_budget, pick_changing, pick_layers, splice, splice_heatmap
from sonde.server.ui.live_chart import category_window, step_columns, step_extent, zoom_window
from sonde.server.ui.run_page import layer_label

TRIPLES = [
    ("train", "activations", "zero_frac"), ("train", "activations", "mean"), ("train", "activations", "histogram"),
    ("train", "activations", "histogram_edges"), ("train", "weights", "norm"), ("train", "weights", "histogram"),
    ("train", "weight_updates", "update_ratio"), ("train", "loss", "loss"), ("eval", "loss", "loss"),
    ("train", "outputs", "train_accuracy"), ("train", "activations", "alert"), ("train", "activations", "saturation"),
]


def test_choices_sort_what_the_store_has_into_views() -> None:
    choices = Choices.from_available(TRIPLES)
    assert choices.phases == ["train", "eval"]
    # Per-layer scalar metrics in topic order; arrays and alerts are not heatmap/line choices.
    assert choices.layer_metrics == {
        "activations": ["mean", "saturation", "zero_frac"], "weights": ["norm"], "weight_updates": ["update_ratio"],
    }
    assert choices.network_metrics == {"loss": ["loss"], "outputs": ["train_accuracy"]}
    assert choices.histogram_topics == ["activations", "weights"]
    assert choices.has_alerts
    assert choices.heatmap_default() == ("activations", "zero_frac")
    assert choices.histogram_default() == "weights"
    assert ("loss", "loss") == choices.all_series()[0]


def test_choices_fall_back_when_the_preferred_metrics_are_missing() -> None:
    only_updates = Choices.from_available([("train", "weight_updates", "update_ratio")])
    assert only_updates.heatmap_default() == ("weight_updates", "update_ratio")
    plugin = Choices.from_available([("train", "my_topic", "my_metric")])  # a metric sonde never heard of
    assert plugin.heatmap_default() == ("my_topic", "my_metric")
    assert Choices.from_available([]).heatmap_default() is None
    assert Choices.from_available([]).histogram_default() is None


def test_pick_layers_spreads_over_the_network() -> None:
    names = [f"l{i}" for i in range(200)]
    picked = pick_layers(names, 4)
    assert picked[0] == "l0" and picked[-1] == "l199" and len(picked) == 4
    assert picked == [names[int(i)] for i in np.round(np.linspace(0, 199, 4))]
    assert pick_layers(names[:3], 4) == names[:3]


def test_heatmap_budget_bounds_the_cells() -> None:
    for layers in (1, 5, 75, 200, 1000):
        columns = heatmap_budget(layers)
        assert 50 <= columns <= 400
        assert layers * columns <= 30_000 or columns == 50


def test_layer_label_names_the_type_when_it_adds_something() -> None:
    assert layer_label({"name": "3", "type": "ReLU"}) == "3 · ReLU"
    assert layer_label({"name": "encoder.relu", "type": "ReLU"}) == "encoder.relu"
    assert layer_label({"name": "fc1", "type": ""}) == "fc1"


def _cells(options: dict, series: int = 0) -> dict[tuple[int, int], float]:
    return {(c[0], c[1]): c[2] for c in options["series"][series]["data"]}


def test_heatmap_cells_rows_and_missing_values() -> None:
    values = [[0.5, 0.25, 0.125], [None, None, None], [1.0, float("nan"), 4.0], [0.0, 2.0, float("inf")]]
    data = {"layers": ["a", "dead-row", "b", "c"], "steps": [0, 10, 20], "values": values}
    opts = heatmap_options(data, title="zero_frac", labels={"a": "a · Linear"})
    # A row with no value at all is left out; the others keep forward order.
    assert opts["yAxis"]["data"] == ["a · Linear", "b", "c"] and opts["yAxis"]["inverse"] is True
    assert opts["xAxis"]["data"] == ["0", "10", "20"]
    grid = np.array([[0.5, 0.25, 0.125], [1.0, np.nan, 4.0], [0.0, 2.0, np.inf]])
    finite = np.isfinite(grid)
    expected = {(x, y): float(grid[y, x]) for y, x in zip(*np.nonzero(finite), strict=True)}
    assert _cells(opts) == pytest.approx(expected)
    # NaN and Inf cells are painted by the second ("NaN / Inf") series.
    assert set(_cells(opts, 1)) == {(x, y) for y, x in zip(*np.nonzero(~finite), strict=True)}
    assert opts["visualMap"]["min"] == pytest.approx(np.min(grid[finite]))
    assert opts["visualMap"]["max"] == pytest.approx(np.max(grid[finite]))


def test_heatmap_on_a_log_scale_colours_by_log10() -> None:
    values = [[1e-4, 1e-3, 0.0], [1e-2, 1e-1, 1.0]]
    opts = heatmap_options({"layers": ["a", "b"], "steps": [0, 1, 2], "values": values}, title="ratio", log=True)
    grid = np.array(values)
    positive = grid > 0
    expected = {(x, y): float(np.log10(grid[y, x])) for y, x in zip(*np.nonzero(positive), strict=True)}
    assert _cells(opts) == pytest.approx(expected, rel=1e-4)
    assert set(_cells(opts, 1)) == {(2, 0)}  # zero has no logarithm: shown as missing
    assert ":formatter" in opts["visualMap"]


def test_heatmap_of_nothing_is_an_empty_chart() -> None:
    opts = heatmap_options({"layers": [], "steps": [], "values": []}, title="x")
    assert opts["series"][0]["data"] == [] and opts["yAxis"]["data"] == []


def test_lines_overlay_with_min_max_band_only_where_downsampled() -> None:
    raw = {"step": [0, 1, 2], "value": [1.0, 2.0, 3.0], "min": [1.0, 2.0, 3.0], "max": [1.0, 2.0, 3.0]}
    bucketed = {"step": [0, 100], "value": [1.5, 2.5], "min": [1.0, -2.0], "max": [9.0, 3.0]}
    opts = lines_options([("fc1", raw), ("fc2", bucketed)], title="norm")
    kinds = [(s["name"], s["type"]) for s in opts["series"]]
    assert kinds == [("fc1", "line"), ("fc2", "line"), ("fc2", "custom")]
    assert opts["series"][0]["data"] == [[0, 1.0], [1, 2.0], [2, 3.0]]
    assert opts["series"][2]["data"] == [[0, 1.0, 9.0], [100, -2.0, 3.0]]
    assert opts["legend"]["data"] == ["fc1", "fc2"]
    assert opts["series"][1]["color"] == opts["series"][2]["color"]  # band drawn in its line's colour


def test_lines_leave_gaps_for_nan_and_nonpositive_on_log() -> None:
    data = {"step": [0, 1, 2, 3], "value": [1.0, float("nan"), -1.0, 10.0]}
    linear = lines_options([("a", data)], title="x")
    assert [v for _, v in linear["series"][0]["data"]] == [1.0, None, -1.0, 10.0]
    log = lines_options([("a", data)], title="x", log=True)
    assert [v for _, v in log["series"][0]["data"]] == [1.0, None, None, 10.0]
    assert log["yAxis"]["type"] == "log"


def test_histogram_over_time_counts_and_shares() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 8)).astype(float)
    counts[1] = 0.0
    counts[1, 3] = 7.0
    edges = np.linspace(-1.0, 1.0, 9)
    opts = histogram_options({"steps": [0, 5, 10], "edges": edges.tolist(), "counts": counts.tolist()}, title="w")
    centres = (edges[:-1] + edges[1:]) / 2
    assert opts["yAxis"]["data"] == [f"{c:.3g}" for c in centres]
    assert opts["xAxis"]["data"] == ["0", "5", "10"]
    cells = {(c[0], c[1]): c for c in opts["series"][0]["data"]}
    assert len(cells) == counts.size  # empty bins are drawn too (darkest colour), not left blank
    for (x, y), cell in cells.items():
        assert cell[2] == pytest.approx(math.log10(1 + counts[x, y]), rel=1e-4)
        assert cell[3] == pytest.approx(100 * counts[x, y] / counts[x].sum(), abs=0.01)
    assert opts["visualMap"]["max"] == pytest.approx(np.log10(1 + counts.max()), rel=1e-4)


def test_zoom_window_maps_percent_to_steps() -> None:
    assert zoom_window((0, 100_000), 25.0, 50.0) == (25_000, 50_000)
    assert zoom_window((1000, 2000), 0.0, 10.0) == (1000, 1100)
    assert zoom_window((0, 10), 0.0, 100.0) is None  # all of it: no detail query
    assert zoom_window((0, 1000), 50.0, 100.0) == (500, None)  # up to the right edge: open, follows a live run
    assert step_extent({"series": [{"type": "line", "data": [[5, 1.0], [70, None]]},
                                   {"type": "custom", "data": [[900, 0.0, 1.0]]}]}) == (5, 70)
    assert step_extent({"series": []}) is None


def test_splice_puts_the_detailed_window_into_the_whole_series() -> None:
    steps = np.arange(0, 100_000, 50)
    coarse = {"step": steps.tolist(), "value": np.sin(steps / 1e4).tolist(),
              "min": (np.sin(steps / 1e4) - 1).tolist(), "max": (np.sin(steps / 1e4) + 1).tolist()}
    window = np.arange(40_000, 40_101)
    fine = {"step": window.tolist(), "value": np.cos(window).tolist(), "min": np.cos(window).tolist(),
            "max": np.cos(window).tolist()}
    out = splice(coarse, fine, 40_000, 40_100)
    expected_steps = np.concatenate([steps[steps < 40_000], window, steps[steps > 40_100]])
    assert out["step"] == expected_steps.tolist()
    inside = (np.array(out["step"]) >= 40_000) & (np.array(out["step"]) <= 40_100)
    assert np.array(out["value"])[inside].tolist() == np.cos(window).tolist()
    assert np.array(out["max"])[~inside].tolist() == (np.sin(expected_steps[~inside] / 1e4) + 1).tolist()
    tail = splice(coarse, fine, 40_000, None)  # open window: nothing of the coarse series after its start
    assert tail["step"] == np.concatenate([steps[steps < 40_000], window]).tolist()


def test_splice_heatmap_puts_the_zoomed_columns_into_the_whole_run() -> None:
    rng = np.random.default_rng(4)
    steps = np.arange(0, 100_000, 500)  # the whole run, 200 coarse columns
    window = np.arange(40_000, 40_400, 2)  # the zoomed range, every recorded step
    coarse_grid, fine_grid = rng.random((3, len(steps))), rng.random((4, len(window)))
    coarse = {"layers": ["a", "b", "c"], "steps": steps.tolist(), "values": coarse_grid.tolist()}
    fine = {"layers": ["a", "b", "c", "late"], "steps": window.tolist(), "values": fine_grid.tolist()}
    out = splice_heatmap(coarse, fine, 40_000, 40_400)
    before, after = steps < 40_000, steps > 40_400
    assert out["steps"] == np.concatenate([steps[before], window, steps[after]]).tolist()
    assert out["layers"] == ["a", "b", "c", "late"]  # forward order kept; a layer only the window has comes last
    for i in range(3):
        assert out["values"][i] == np.concatenate([coarse_grid[i][before], fine_grid[i],
                                                   coarse_grid[i][after]]).tolist()
    n_before, n_after = int(before.sum()), int(after.sum())
    assert out["values"][3] == [None] * n_before + fine_grid[3].tolist() + [None] * n_after
    tail = splice_heatmap(coarse, fine, 40_000, None)  # open window: the fine columns reach the newest step
    assert tail["steps"] == np.concatenate([steps[before], window]).tolist()
    empty = splice_heatmap(coarse, {"layers": [], "steps": [], "values": []}, 40_000, 40_400)
    assert empty["steps"] == np.concatenate([steps[before], steps[after]]).tolist()
    assert empty["values"][0] == np.concatenate([coarse_grid[0][before], coarse_grid[0][after]]).tolist()


def test_category_window_maps_zoom_percent_to_step_columns() -> None:
    columns = list(range(0, 1010, 10))  # 101 columns: one percent is one column
    assert category_window(columns, 25.0, 50.0) == (250, 500)
    assert category_window(columns, 25.5, 49.5) == (250, 500)  # rounded outwards: nothing shown is left out
    assert category_window(columns, 90.0, 100.0) == (900, None)  # to the right edge: open, follows a live run
    assert category_window(columns, 0.0, 100.0) is None
    assert category_window([], 10.0, 20.0) is None
    spliced = [0, 500, 40_000, 40_002, 40_004, 40_006, 99_500]  # uneven columns after a splice
    last = len(spliced) - 1
    first, final = int(np.floor(last * 30 / 100)), int(np.ceil(last * 70 / 100))
    assert category_window(spliced, 30.0, 70.0) == (spliced[first], spliced[final]) == (500, 40_006)
    heat = heatmap_options({"layers": ["a"], "steps": spliced, "values": [[1.0] * 7]}, title="x")
    assert step_columns(heat) == spliced
    assert step_columns(lines_options([("a", {"step": [0, 1], "value": [1.0, 2.0]})], title="y")) is None


def test_a_zoomed_heatmap_is_pinned_to_its_window_columns() -> None:
    steps = [0, 500, 40_000, 40_002, 40_004, 99_500]
    data = {"layers": ["a"], "steps": steps, "values": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]}
    zoomed = heatmap_options(data, title="x", window=(40_000, 40_004))["dataZoom"]
    assert [(z["startValue"], z["endValue"]) for z in zoomed] == [(2, 4), (2, 4)]  # column indices
    assert all("start" not in z for z in zoomed)  # value mode: the extra columns do not move the view
    newest = heatmap_options(data, title="x", window=(40_000, None))["dataZoom"]
    assert [(z["startValue"], z["endValue"]) for z in newest] == [(2, 5), (2, 5)]
    whole = heatmap_options(data, title="x")["dataZoom"]
    assert [(z["start"], z["end"]) for z in whole] == [(0, 100), (0, 100)]  # "reset zoom" really resets
    assert [z["type"] for z in whole] == ["inside", "slider"]


def test_pick_changing_prefers_the_layers_that_moved() -> None:
    rng = np.random.default_rng(1)
    values = rng.random((6, 20)) * 0.05 + 0.4
    values[2] = np.linspace(0.4, 1.0, 20)  # units dying
    values[4, 10:] = 1.0  # dying later
    values[5] = np.nan  # nothing finite: never picked
    data = {"layers": [f"l{i}" for i in range(6)], "values": values.tolist()}
    picked = pick_changing(data, 3)
    spans = np.nanmax(values[:5], axis=1) - np.nanmin(values[:5], axis=1)
    expected = sorted(np.argsort(-spans, kind="stable")[:3].tolist())
    assert picked == [f"l{i}" for i in expected]
    assert {"l2", "l4"} <= set(picked)
