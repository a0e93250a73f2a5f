"""sonde.load: the public way back from a store to a DataFrame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sonde.errors import ConfigError, StoreError
from sonde.load import load
from sonde.records import Record
from sonde.run_info import RunInfo
from sonde.store import open_store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "sonde.db"
    store = open_store(path)
    for run in ("mlp", "cnn"):
        store.start_run(RunInfo(run), resume=False)
        store.write(run, [Record(run, s, "train", layer, "weights", "norm", s + 0.5)
                          for s in range(3) for layer in ("fc2", "fc1")])
        store.write(run, [Record(run, 0, "train", "fc1", "weights", "histogram", np.array([1.0, 2.0]))])
    store.close()
    return path


def test_load_tidy_and_filtered(db: Path) -> None:
    df = load(db, run="mlp")
    assert list(df.columns) == ["run", "step", "phase", "layer", "topic", "metric", "value"]
    assert df[["step", "layer"]].values.tolist() == [[0, "fc1"], [0, "fc2"], [1, "fc1"], [1, "fc2"], [2, "fc1"],
                                                     [2, "fc2"]]
    assert df["value"].tolist() == [0.5, 0.5, 1.5, 1.5, 2.5, 2.5]
    assert len(load(str(db))) == 12
    assert load(db, layers="fc2", run="cnn")["value"].tolist() == [0.5, 1.5, 2.5]
    arrays = load(db, run="cnn", arrays=True)
    assert arrays["metric"].tolist() == ["histogram"]
    np.testing.assert_array_equal(arrays["value"][0], [1.0, 2.0])


def test_load_accepts_an_open_store(db: Path) -> None:
    store = open_store(db)
    assert len(load(store, run="mlp", metrics="norm")) == 6
    assert len(store.load("cnn")) == 6  # still open: load() does not close a store it did not open
    store.close()


def test_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.db"
    with pytest.raises(StoreError, match=r"no sonde store at '.*nothing\.db'; record a run first with sonde\.probe"):
        load(missing)
    assert not missing.exists()  # loading never creates a store


def test_unknown_run_lists_the_runs(db: Path) -> None:
    with pytest.raises(ConfigError, match=r"no run 'rnn'.*'cnn', 'mlp'"):
        load(db, run="rnn")
