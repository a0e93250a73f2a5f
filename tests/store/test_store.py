"""The SQL store: round trips, runs, resume, migrations, concurrency, failures."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect

from sonde.errors import ConfigError, RunExistsError, StoreError
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo
from sonde.sinks.store import StoreSink
from sonde.store import Store, open_store
from sonde.store.schema import SCHEMA_VERSION


def rec(run: str, step: int, layer: str, metric: str, value: float | np.ndarray, topic: str = "weights",
        phase: str = "train") -> Record:
    return Record(run, step, phase, layer, topic, metric, value)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "sonde.db") as s:
        yield s


def test_plain_path_is_sqlite_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "s.db"
    open_store(path).close()
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_scalars_and_arrays_round_trip(store: Store) -> None:
    store.start_run(RunInfo("r", model="MLP", framework="torch"), resume=False)
    hist = np.array([1.0, 2.5, -3.0, np.inf])
    batch = [rec("r", 1, "fc2", "norm", 2.0), rec("r", 0, "fc1", "norm", 1.5), rec("r", 0, "fc1", "mean", -0.25),
             rec("r", 0, "fc1", "histogram", hist), rec("r", 0, "", "loss", 0.7, topic="loss"),
             rec("r", 0, "fc1", "nan", float("nan"))]
    store.write("r", batch)
    df = store.load("r")
    assert list(df.columns) == ["run", "step", "phase", "layer", "topic", "metric", "value"]
    assert df["value"].dtype == np.float64 and df["step"].dtype == np.int64
    got = [tuple(row) for row in df[["step", "layer", "topic", "metric"]].itertuples(index=False)]
    assert got == [(0, "", "loss", "loss"), (0, "fc1", "weights", "mean"), (0, "fc1", "weights", "nan"),
                   (0, "fc1", "weights", "norm"), (1, "fc2", "weights", "norm")]
    assert df["value"].tolist()[:2] == [0.7, -0.25] and np.isnan(df["value"][2])
    arrays = store.load("r", arrays=True)
    assert len(arrays) == 1 and arrays["metric"][0] == "histogram"
    value = arrays["value"][0]
    assert isinstance(value, np.ndarray) and value.dtype == np.float64
    np.testing.assert_array_equal(value, hist)


def test_filters(store: Store) -> None:
    for name in ("a", "b"):
        store.start_run(RunInfo(name), resume=False)
        store.write(name, [rec(name, s, layer, m, float(s), phase=phase)
                           for s in range(3) for layer in ("l1", "l2") for m in ("mean", "std")
                           for phase in ("train", "eval")])
    assert len(store.load()) == 2 * 3 * 2 * 2 * 2
    assert set(store.load("a")["run"]) == {"a"}
    assert set(store.load(["a", "b"])["run"]) == {"a", "b"}
    df = store.load("b", layers="l2", metrics=["std"], phase="eval")
    assert len(df) == 3 and set(df["layer"]) == {"l2"} and set(df["metric"]) == {"std"} and set(df["phase"]) == {"eval"}
    assert df["step"].tolist() == [0, 1, 2]
    assert store.load("a", topics="activations").empty
    with pytest.raises(ConfigError, match="no run 'zzz'.*'a', 'b'"):
        store.load("zzz")


def test_runs_layers_and_finish(store: Store) -> None:
    info = RunInfo("r", model="MLP", framework="torch", config={"lr": 0.1},
                   layers=[LayerInfo("fc1", "Linear", {"weight": [4, 3]}), LayerInfo("act", "ReLU")])
    assert store.start_run(info, resume=False) == 0
    store.write("r", [rec("r", s, "fc1", "norm", 1.0) for s in range(5)])
    runs = store.runs()
    row = runs.iloc[0]
    got = [row["name"], row["model"], row["framework"], row["status"], row["steps"]]
    assert got == ["r", "MLP", "torch", "running", 5]
    assert runs["ended_at"].isna().all()
    store.finish_run("r", "failed")
    runs = store.runs()
    row = runs.iloc[0]
    assert row["status"] == "failed" and bool(row["ended_at"] >= row["started_at"])
    layers = store.layers("r")
    assert layers["name"].tolist() == ["fc1", "act"] and layers["position"].tolist() == [0, 1]
    assert layers["param_shapes"][0] == {"weight": [4, 3]}
    with pytest.raises(ConfigError):
        store.finish_run("r", "done")


def test_run_exists_and_resume_continues_steps(store: Store) -> None:
    store.start_run(RunInfo("x", layers=[LayerInfo("fc1", "Linear")]), resume=False)
    store.write("x", [rec("x", s, "fc1", "norm", 1.0) for s in range(4)] + [rec("x", 6, "fc1", "norm", 1.0)])
    store.finish_run("x", "finished")
    store.start_run(RunInfo("x-2"), resume=False)
    with pytest.raises(RunExistsError) as err:
        store.start_run(RunInfo("x"), resume=False)
    message = str(err.value)
    assert "run 'x' already exists" in message and "5 records, last step 6" in message
    assert "resume=True" in message and "'x-3'" in message
    first = store.start_run(RunInfo("x", layers=[LayerInfo("fc1", "Conv"), LayerInfo("fc2", "Linear")]), resume=True)
    assert first == 7
    assert store.runs().set_index("name").loc["x", "status"] == "running"
    layers = store.layers("x")
    assert layers["name"].tolist() == ["fc1", "fc2"] and layers["type"].tolist() == ["Conv", "Linear"]
    store.write("x", [rec("x", first, "fc1", "norm", 2.0)])
    assert store.load("x")["step"].tolist() == [0, 1, 2, 3, 6, 7]
    assert store.start_run(RunInfo("new"), resume=True) == 0  # resume of an unknown name just starts it


def test_unique_run_name(store: Store) -> None:
    assert store.unique_run_name("m") == "m"
    for name in ("m", "m-2", "m-4", "m_x", "m%"):
        store.start_run(RunInfo(name), resume=False)
    assert store.unique_run_name("m") == "m-3"
    assert store.unique_run_name("m%") == "m%-2"
    assert store.unique_run_name("m-2") == "m-2-2"


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for _ in range(3):
        open_store(path).close()
    with sqlite3.connect(path) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_opening_a_version_0_store_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE NOT NULL)")
    store = open_store(path)
    try:
        assert {"runs", "layers", "records"} <= set(inspect(store.engine).get_table_names())
        index = inspect(store.engine).get_indexes("records")[0]
        assert index["column_names"] == ["series_id", "step", "value"]
        store.start_run(RunInfo("r"), resume=False)
        store.write("r", [rec("r", 0, "l", "m", 1.0)])
        assert len(store.load("r")) == 1
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    open_store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(StoreError, match="schema version 99.*upgrade sonde"):
        open_store(path)


def test_unwritable_path_and_bad_url(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "x.db"
    with pytest.raises(StoreError, match=r"file/x\.db.*writable"):
        open_store(bad)
    with pytest.raises(StoreError, match="ftp://nowhere.*postgresql"):
        open_store("ftp://nowhere/db")
    with pytest.raises(StoreError, match="sonde store"):
        open_store(tmp_path)  # a directory is not a database file


def test_failed_write_keeps_earlier_batches_and_is_atomic(store: Store) -> None:
    store.start_run(RunInfo("r"), resume=False)
    store.write("r", [rec("r", 0, "l", "m", 1.0), rec("r", 0, "l", "s", 2.0)])
    broken = [rec("r", 1, "l", "m", 3.0), Record("r", None, "train", "l", "weights", "s", 4.0)]  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="cannot write 2 records of run 'r'"):
        store.write("r", broken)
    with pytest.raises(StoreError, match="value must be a float"):
        store.write("r", [rec("r", 2, "l", "m", "oops")])  # type: ignore[arg-type]
    df = store.load("r")
    assert df[["step", "metric", "value"]].values.tolist() == [[0, "m", 1.0], [0, "s", 2.0]]
    assert store.runs().loc[0, "steps"] == 1  # the failed batch did not move last_step either
    store.write("r", [rec("r", 1, "l", "m", 5.0)])  # the store is still usable
    assert len(store.load("r")) == 3
    with pytest.raises(ConfigError, match="no run 'ghost'"):
        store.write("ghost", [rec("ghost", 0, "l", "m", 1.0)])


def test_read_while_writing_on_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    writer = open_store(path)
    reader = open_store(path)
    writer.start_run(RunInfo("r"), resume=False)
    steps, per_step = 200, 50
    counts: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for s in range(steps):
                writer.write("r", [rec("r", s, f"l{i}", "m", float(s)) for i in range(per_step)])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    def read(store: Store) -> None:
        try:
            while not done.is_set():
                counts.append(len(store.load("r")))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read, args=(reader,)),
               threading.Thread(target=read, args=(writer,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert counts and all(c % per_step == 0 for c in counts)  # every read sees whole transactions only
    assert len(reader.load("r")) == steps * per_step
    writer.close()
    reader.close()


def test_in_memory_url(tmp_path: Path) -> None:
    store = open_store("sqlite://")
    store.start_run(RunInfo("r"), resume=False)
    store.write("r", [rec("r", 0, "l", "m", 1.0)])
    assert store.load("r")["value"].tolist() == [1.0]
    store.close()


def test_store_sink(tmp_path: Path) -> None:
    path = tmp_path / "sink" / "s.db"
    sink = StoreSink(path, batch_records=3, max_delay=0.05)
    info = RunInfo("r", layers=[LayerInfo("fc1", "Linear")])
    sink.open(info)
    assert info.first_step == 0 and sink.name == "store"
    sink.write([rec("r", 0, "fc1", "m", 1.0), rec("r", 0, "fc1", "s", 2.0)])
    sink.write([rec("r", 1, "fc1", "m", 3.0), rec("r", 1, "fc1", "s", 4.0)])  # reaches batch_records: written
    sink.write([rec("r", 2, "fc1", "m", 5.0)])
    with open_store(path) as reader:
        assert len(reader.load("r")) >= 4
        threading.Event().wait(0.3)  # the timer writes the last one within max_delay
        assert len(reader.load("r")) == 5
    sink.close("finished")
    resumed = RunInfo("r", resume=True)
    again = StoreSink(str(path))
    again.open(resumed)
    assert resumed.first_step == 3
    again.close("failed")
    with open_store(path) as reader:
        assert reader.runs().loc[0, "status"] == "failed"
    with pytest.raises(StoreError):
        StoreSink(tmp_path / "sink" / "s.db" / "x.db").open(RunInfo("q"))
    with pytest.raises(RunExistsError):
        StoreSink(path).open(RunInfo("r"))



def test_a_run_config_beyond_the_bounds_is_refused_before_anything_is_written(store: Store) -> None:
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(40):
        deep = {"a": deep}
    with pytest.raises(ConfigError, match="at most 32 levels"):
        store.start_run(RunInfo("deep", config=deep))
    with pytest.raises(ConfigError, match="at most 65536 bytes"):
        StoreSink(store).open(RunInfo("large", config={"notes": "x" * 70_000}))  # what a probe's store sink does
    assert store.run_infos() == []
