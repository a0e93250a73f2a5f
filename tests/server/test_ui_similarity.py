"""The CKA matrix chart: what it shows is the matrix the test wrote, cell for cell, in forward order.

The matrix is a numpy array built here and written as ``cka_matrix:<b>`` Records; the chart's
cells are read back into an array and compared with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sonde.records import Record
from sonde.server.ui.similarity import (
    CKA_PREFIX,
    CKA_TOPIC,
    matrix_options,
    matrix_phases,
    matrix_size,
    matrix_step,
)
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import open_store

LAYERS = ["embed", "block.0", "block.1", "head"]  # forward order, not alphabetical


def _chart_matrix(options: dict, n: int) -> np.ndarray:
    """The matrix a chart draws: series 0 cells as values, series 1 cells (missing) as NaN."""
    out = np.full((n, n), -1.0)
    for x, y, v in options["series"][0]["data"]:
        out[y, x] = v
    for x, y, _ in options["series"][1]["data"]:
        out[y, x] = np.nan
    return out


def _cka_like(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 6))
    g = np.abs(np.corrcoef(x))  # symmetric, 1 on the diagonal, in 0..1 like CKA
    return np.asarray(g, dtype=float)


def test_chart_shows_the_written_matrix_in_forward_order(tmp_path: Path) -> None:
    store = open_store(tmp_path / "sonde.db")
    store.start_run(RunInfo("r", layers=[LayerInfo(n, "Linear") for n in LAYERS]), resume=False)
    expected = {step: _cka_like(step, len(LAYERS)) for step in (0, 10, 20)}
    missing = {(1, 3), (2, 0)}
    for step, m in expected.items():
        order = [3, 1, 0, 2]  # written out of order
        store.write("r", [Record("r", step, "train", LAYERS[i], CKA_TOPIC, f"{CKA_PREFIX}{LAYERS[j]}", float(m[i, j]))
                          for i in order for j in order if step != 20 or (i, j) not in missing])
    assert matrix_phases(store.available("r")) == ["train"]

    data = store.matrix("r", CKA_TOPIC, CKA_PREFIX)
    labels = {"block.0": "block.0 · Linear"}
    options = matrix_options(data, title="CKA", labels=labels)
    assert options["yAxis"]["data"] == ["embed", "block.0 · Linear", "block.1", "head"]
    assert options["xAxis"]["data"] == options["yAxis"]["data"]
    assert options["yAxis"]["inverse"] is True  # first layer on top, as in the overview heatmap
    assert options["title"]["text"] == "CKA · step 20"
    want = expected[20].copy()
    for i, j in missing:
        want[i, j] = np.nan
    np.testing.assert_allclose(_chart_matrix(options, len(LAYERS)), want, rtol=1e-4, atol=0)
    assert sorted((y, x) for x, y, _ in options["series"][1]["data"]) == sorted(missing)
    assert (options["visualMap"]["min"], options["visualMap"]["max"]) == (0.0, 1.0)

    earlier = matrix_options(store.matrix("r", CKA_TOPIC, CKA_PREFIX, step=10))
    np.testing.assert_allclose(_chart_matrix(earlier, len(LAYERS)), expected[10], rtol=1e-4, atol=0)
    assert earlier["series"][1]["data"] == []
    store.close()


def test_non_finite_values_are_missing_cells() -> None:
    data = {"layers": ["a", "b"], "step": 3, "values": [[1.0, float("nan")], [None, float("inf")]]}
    options = matrix_options(data)
    assert options["series"][0]["data"] == [[0, 0, 1.0]]
    assert sorted(options["series"][1]["data"]) == [[0, 1, 0], [1, 0, 0], [1, 1, 0]]


def test_phases_and_step_choice() -> None:
    triples = [("eval", CKA_TOPIC, "cka_matrix:a"), ("train", CKA_TOPIC, "cka_matrix:a"),
               ("train", CKA_TOPIC, "cka"), ("probe", "weights", "cka_matrix:a"), ("x", CKA_TOPIC, "cka_matrix:")]
    assert matrix_phases(triples) == ["train", "eval"]
    assert matrix_phases([]) == []
    steps = [0, 100, 200]
    assert matrix_step(steps, 100, None) == 200  # following the latest
    assert matrix_step(steps, 200, 0) == 0  # a chosen step stays while it exists
    assert matrix_step(steps, 200, 50) == 200  # a step that is not recorded: the latest


def test_square_cells() -> None:
    names = ["layer"] * 10
    width, height = matrix_size(10, names)
    margin = min(14 + 7 * 5, 220)
    assert width - margin - 96 == height - 40 - margin  # plot area as wide as it is tall
    assert matrix_size(200, names)[1] - 40 - margin >= 10 * 200  # cells never thinner than 10 px
