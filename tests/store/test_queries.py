"""The store's plotting queries, batch ids, graphs and deletes, on SQLite and PostgreSQL.

Every expected value is computed here with numpy from the Records the test wrote.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect

from sonde.errors import ConfigError, StoreError
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo
from sonde.store import Store, open_store


def _run(store: Store, name: str, layers: list[str]) -> str:
    store.start_run(RunInfo(name, model="M", layers=[LayerInfo(n, "Linear") for n in layers]), resume=False)
    return name


def _scalars(run: str, layer: str, values: np.ndarray, metric: str = "norm", phase: str = "train",
             steps: np.ndarray | None = None) -> list[Record]:
    steps = np.arange(len(values)) if steps is None else steps
    return [Record(run, int(s), phase, layer, "weights", metric, float(v)) for s, v in zip(steps, values)]


def test_short_series_comes_back_exactly(any_store: Store) -> None:
    run = _run(any_store, "short", ["fc1"])
    values = np.random.default_rng(0).normal(size=50)
    values[7] = np.nan
    any_store.write(run, _scalars(run, "fc1", values))
    out = any_store.series(run, "fc1", "weights", "norm")
    assert out["step"] == list(range(50))
    expected = [None if np.isnan(v) else float(v) for v in values]
    assert out["value"] == expected and out["min"] == expected and out["max"] == expected


def test_downsampled_series_keeps_each_buckets_mean_min_max_and_a_one_step_spike(any_store: Store) -> None:
    run = _run(any_store, "long", ["fc1"])
    rng = np.random.default_rng(1)
    n = 10_000
    values = rng.normal(size=n)
    values[4321] = 1e6  # a spike of one step
    any_store.write(run, _scalars(run, "fc1", values))
    out = any_store.series(run, "fc1", "weights", "norm", max_points=97)
    steps = out["step"]
    assert 1 < len(steps) <= 97 and steps[0] == 0 and steps == sorted(steps)
    bounds = [*steps, n]
    for i in range(len(steps)):
        chunk = values[bounds[i]:bounds[i + 1]]
        assert out["value"][i] == pytest.approx(chunk.mean(), rel=1e-9, abs=1e-9)
        assert out["min"][i] == pytest.approx(chunk.min()) and out["max"][i] == pytest.approx(chunk.max())
    assert max(out["max"]) == 1e6
    assert max(out["value"]) < 1e6  # the mean alone would hide how high it went; max does not


def test_series_bounds_and_phases_are_separate(any_store: Store) -> None:
    run = _run(any_store, "bounds", ["fc1"])
    train, evaluation = np.arange(100.0), -np.arange(100.0)
    any_store.write(run, _scalars(run, "fc1", train) + _scalars(run, "fc1", evaluation, phase="eval"))
    out = any_store.series(run, "fc1", "weights", "norm", start=10, end=19)
    assert out["step"] == list(range(10, 20)) and out["value"] == train[10:20].tolist()
    assert any_store.series(run, "fc1", "weights", "norm", phase="eval")["value"] == evaluation.tolist()
    assert any_store.series(run, "fc1", "weights", "mean") == {"step": [], "value": [], "min": [], "max": []}


def test_heatmap_rows_in_forward_order_cells_at_evenly_picked_steps(any_store: Store) -> None:
    order = ["conv", "block.fc", "act", "head"]  # forward order, not alphabetical
    run = _run(any_store, "heat", order)
    rng = np.random.default_rng(2)
    steps = np.arange(0, 3000, 3)  # every=3
    table = {name: rng.normal(size=len(steps)) for name in order}
    table["act"][10] = np.nan
    records = [r for name in order if name != "head" for r in _scalars(run, name, table[name], steps=steps)]
    records += _scalars(run, "head", table["head"][::2], steps=steps[::2])  # recorded every other step only
    any_store.write(run, records)
    out = any_store.heatmap(run, "weights", "norm", max_steps=40)
    assert out["layers"] == order
    picked = out["steps"]
    assert len(picked) == 40 and picked[0] == 0 and picked[-1] == steps[-1] and set(picked) <= set(steps.tolist())
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 3  # evenly spread (to the recording interval)
    position = {int(s): i for i, s in enumerate(steps)}
    head_steps = set(steps[::2].tolist())
    for row, name in zip(out["values"], order):
        for step, cell in zip(picked, row):
            if name == "head" and step not in head_steps:
                assert cell is None
                continue
            expected = table[name][position[step]]  # head keeps table["head"][::2] at steps[::2]
            assert cell == (None if np.isnan(expected) else pytest.approx(expected))
    short = any_store.heatmap(run, "weights", "norm", max_steps=5000)
    assert short["steps"] == steps.tolist()
    assert short["values"][1] == pytest.approx(table["block.fc"].tolist())
    assert any_store.heatmap(run, "weights", "nope") == {"layers": [], "steps": [], "values": [], "truncated": False}
    assert short["truncated"] is False


def test_heatmap_of_a_step_range_picks_evenly_inside_it(any_store: Store) -> None:
    order = ["conv", "fc", "head"]
    run = _run(any_store, "zoom", order)
    rng = np.random.default_rng(7)
    steps = np.arange(0, 10_000, 2)  # every=2
    table = {name: rng.normal(size=len(steps)) for name in order}
    table["fc"][2600] = np.nan  # step 5200, inside the range below
    any_store.write(run, [r for name in order for r in _scalars(run, name, table[name], steps=steps)])
    position = {int(s): i for i, s in enumerate(steps)}

    def expected(name: str, picked: list[int]) -> list[object]:
        return [None if np.isnan(v) else pytest.approx(v) for v in (table[name][position[s]] for s in picked)]

    out = any_store.heatmap(run, "weights", "norm", max_steps=25, start=5001, end=5999)
    inside = [int(s) for s in steps if 5001 <= s <= 5999]  # 5002 .. 5998, 499 recorded steps
    assert out["layers"] == order
    picked = out["steps"]
    assert len(picked) == 25 and picked[0] == inside[0] and picked[-1] == inside[-1]
    assert set(picked) <= set(inside)
    gaps = np.diff(picked)
    assert gaps.min() >= 2 and gaps.max() - gaps.min() <= 2  # evenly spread inside the range
    for row, name in zip(out["values"], order):
        assert row == expected(name, picked)
    # A range that holds fewer steps than max_steps comes back whole: every step the test wrote there.
    detail = any_store.heatmap(run, "weights", "norm", max_steps=400, start=5190, end=5210)
    assert detail["steps"] == list(range(5190, 5211, 2))
    assert detail["values"][1] == expected("fc", detail["steps"]) and detail["values"][1][5] is None
    # Open on either side.
    head = any_store.heatmap(run, "weights", "norm", max_steps=400, end=9)
    assert head["steps"] == [0, 2, 4, 6, 8] and head["values"][2] == expected("head", [0, 2, 4, 6, 8])
    tail = any_store.heatmap(run, "weights", "norm", max_steps=3, start=9000)
    assert tail["steps"] == [9000, 9500, 9998]  # evenly: first, middle, last of the range
    assert any_store.heatmap(run, "weights", "norm", start=20_000)["steps"] == []
    assert any_store.heatmap(run, "weights", "norm", start=10, end=5)["steps"] == []
    with pytest.raises(ConfigError, match="start"):
        any_store.heatmap(run, "weights", "norm", start=-1)
    with pytest.raises(ConfigError, match="end"):
        any_store.heatmap(run, "weights", "norm", end=2.5)  # type: ignore[arg-type]


def test_histograms_over_time(any_store: Store) -> None:
    run = _run(any_store, "hist", ["fc1"])
    rng = np.random.default_rng(3)
    edges = np.linspace(-1.0, 1.0, 9)
    counts = {s: rng.integers(0, 100, size=8).astype(float) for s in range(0, 500, 5)}
    records = [Record(run, 0, "train", "fc1", "weights", "histogram_edges", edges)]
    records += [Record(run, s, "train", "fc1", "weights", "histogram", c) for s, c in counts.items()]
    any_store.write(run, records)
    out = any_store.histograms(run, "fc1", "weights", max_steps=10)
    assert out["edges"] == edges.tolist()
    assert len(out["steps"]) == 10 and out["steps"][0] == 0 and out["steps"][-1] == 495
    for step, row in zip(out["steps"], out["counts"]):
        assert row == counts[step].tolist()
    assert out["truncated"] is False
    assert any_store.histograms(run, "fc1", "inputs") == {"steps": [], "edges": [], "counts": [], "truncated": False}


def test_available_lists_phase_topic_metric(any_store: Store) -> None:
    run = _run(any_store, "avail", ["fc1"])
    evaluation = _scalars(run, "fc1", np.ones(3), metric="mean", phase="eval")
    loss = [Record(run, 0, "train", "", "loss", "loss", 0.5)]
    any_store.write(run, _scalars(run, "fc1", np.ones(3)) + evaluation + loss)
    assert any_store.available(run) == [("eval", "weights", "mean"), ("train", "loss", "loss"),
                                        ("train", "weights", "norm")]


def test_replayed_batch_is_stored_once(any_store: Store) -> None:
    run = _run(any_store, "replay", ["fc1"])
    other = _run(any_store, "other", ["fc1"])
    batch = _scalars(run, "fc1", np.arange(10.0))
    batch_id = str(uuid.uuid4())
    assert any_store.write_batch(run, batch_id, batch) is True
    assert any_store.write_batch(run, batch_id, batch) is False
    assert len(any_store.load(run)) == 10
    assert any_store.write_batch(other, batch_id, _scalars(other, "fc1", np.arange(3.0))) is True  # ids are per run
    assert len(any_store.load(other)) == 3
    with pytest.raises(ConfigError, match="batch_id"):
        any_store.write_batch(run, "", batch)


def test_concurrent_replays_store_the_batch_once(any_store: Store) -> None:
    run = _run(any_store, "race", ["fc1"])
    batch = _scalars(run, "fc1", np.arange(200.0))
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def send() -> None:
        barrier.wait()
        results.append(any_store.write_batch(run, "same-id", batch))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert len(any_store.load(run)) == 200


def test_graph_put_replace_get(any_store: Store) -> None:
    run = _run(any_store, "graph", ["fc1"])
    assert any_store.get_graph(run) is None
    any_store.put_graph(run, {"nodes": [{"id": "fc1"}], "edges": []})
    any_store.put_graph(run, {"nodes": [{"id": "fc1"}, {"id": "fc2"}], "edges": [["fc1", "fc2"]]})
    assert any_store.get_graph(run) == {"nodes": [{"id": "fc1"}, {"id": "fc2"}], "edges": [["fc1", "fc2"]]}
    with pytest.raises(ConfigError, match="JSON object"):
        any_store.put_graph(run, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no run"):
        any_store.get_graph("absent")


def test_delete_run_removes_everything_of_it_and_nothing_else(any_store: Store) -> None:
    gone = _run(any_store, "gone", ["fc1"])
    kept = _run(any_store, "kept", ["fc1"])
    any_store.write_batch(gone, "b1", _scalars(gone, "fc1", np.arange(5.0)))
    any_store.write_batch(kept, "b1", _scalars(kept, "fc1", np.arange(7.0)))
    any_store.put_graph(gone, {"nodes": []})
    any_store.delete_run(gone)
    assert any_store.run_info(gone) is None and not any_store.has_run(gone)
    assert [r["name"] for r in any_store.run_infos()] == ["kept"]
    assert len(any_store.load(kept)) == 7 and any_store.get_graph(kept) is None
    with pytest.raises(ConfigError, match="no run"):
        any_store.series(gone, "fc1", "weights", "norm")
    # A new run of the same name starts empty: no records, no graph, no remembered batch ids.
    _run(any_store, "gone", ["fc1"])
    assert any_store.get_graph("gone") is None and any_store.available("gone") == []
    assert any_store.write_batch("gone", "b1", _scalars("gone", "fc1", np.arange(2.0))) is True
    assert len(any_store.load("gone")) == 2
    with pytest.raises(ConfigError, match="no run"):
        any_store.delete_run("never")


def test_limits_are_checked(any_store: Store) -> None:
    run = _run(any_store, "limits", ["fc1"])
    with pytest.raises(ConfigError, match="max_points"):
        any_store.series(run, "fc1", "weights", "norm", max_points=0)
    with pytest.raises(ConfigError, match="max_steps"):
        any_store.heatmap(run, "weights", "norm", max_steps=10**6)


_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at {float} NOT NULL);
CREATE TABLE runs (id {serial} PRIMARY KEY, name TEXT NOT NULL UNIQUE, model TEXT NOT NULL, framework TEXT NOT NULL,
    config TEXT NOT NULL, status TEXT NOT NULL, started_at {float} NOT NULL, updated_at {float} NOT NULL,
    ended_at {float}, last_step INTEGER);
CREATE TABLE layers (id {serial} PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, param_shapes TEXT NOT NULL,
    CONSTRAINT uq_layers_run_name UNIQUE (run_id, name));
CREATE TABLE records (id {serial} PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL, phase TEXT NOT NULL, layer TEXT NOT NULL, topic TEXT NOT NULL, metric TEXT NOT NULL,
    value {float}, "array" {blob});
CREATE INDEX ix_records_series ON records (run_id, layer, topic, metric, step);
INSERT INTO schema_version VALUES (1, 0);
INSERT INTO runs (name, model, framework, config, status, started_at, updated_at, last_step)
    VALUES ('old', 'MLP', 'torch', '{{}}', 'finished', 0, 0, 3);
INSERT INTO layers (run_id, position, name, type, param_shapes) VALUES (1, 0, 'fc1', 'Linear', '{{}}');
INSERT INTO records (run_id, step, phase, layer, topic, metric, value) VALUES
    (1, 0, 'train', 'fc1', 'weights', 'norm', 0.0), (1, 1, 'train', 'fc1', 'weights', 'norm', 1.0),
    (1, 2, 'train', 'fc1', 'weights', 'norm', 2.0), (1, 3, 'train', 'fc1', 'weights', 'norm', 3.0),
    (1, 3, 'eval', '', 'loss', 'loss', 0.25);
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_store_is_migrated_with_its_records(backend: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    """A store written by sonde 0.1 (names in every record) opens with every record in its series."""
    if backend == "sqlite":
        url = str(tmp_path / "v1.db")
        with sqlite3.connect(url) as conn:
            conn.executescript(_V1_SCHEMA.format(float="DOUBLE", serial="INTEGER", blob="BLOB"))
    else:
        url = request.getfixturevalue("pg_url")
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:  # the URL's options pick the test's schema
            conn.execute(_V1_SCHEMA.format(float="DOUBLE PRECISION", serial="SERIAL", blob="BYTEA"))
    with open_store(url) as store:
        assert store.available("old") == [("eval", "loss", "loss"), ("train", "weights", "norm")]
        assert store.series("old", "fc1", "weights", "norm")["value"] == [0.0, 1.0, 2.0, 3.0]
        assert store.heatmap("old", "weights", "norm")["values"] == [[0.0, 1.0, 2.0, 3.0]]
        df = store.load("old")
        assert df[["step", "phase", "layer", "metric", "value"]].values.tolist() == [
            [0, "train", "fc1", "norm", 0.0], [1, "train", "fc1", "norm", 1.0], [2, "train", "fc1", "norm", 2.0],
            [3, "eval", "", "loss", 0.25], [3, "train", "fc1", "norm", 3.0]]
        with store.engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("records")}
        assert columns == {"id", "run_id", "step", "value", "array", "series_id"}
        store.write("old", [Record("old", 4, "train", "fc1", "weights", "norm", 4.0)])
        assert store.series("old", "fc1", "weights", "norm")["value"] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_bad_records_are_refused_whole_with_a_clear_error(any_store: Store) -> None:
    run = _run(any_store, "bad", ["fc1"])
    good = _scalars(run, "fc1", np.arange(3.0))
    with pytest.raises(StoreError, match="must be strings"):
        any_store.write(run, [*good, Record(run, 3, "train", ["fc1"], "weights", "norm", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="must be strings"):
        any_store.write(run, [*good, Record(run, 3, "train", None, "weights", "norm", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="float"):
        any_store.write(run, [*good, Record(run, 3, "train", "fc1", "weights", "norm", "high")])  # type: ignore[arg-type]
    assert any_store.load(run).empty  # all of a batch or none of it
    any_store.write(run, good)
    assert any_store.series(run, "fc1", "weights", "norm")["value"] == [0.0, 1.0, 2.0]
