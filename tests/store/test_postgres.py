"""The PostgreSQL path for real: open by URL, migrate, write, resume, load (needs SONDE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import inspect

from sonde.errors import RunExistsError
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo
from sonde.store import open_store
from sonde.store.schema import SCHEMA_VERSION


def test_plain_postgresql_url_opens_with_psycopg3_and_migrates_once(pg_url: str) -> None:
    assert pg_url.startswith("postgresql://")
    for _ in range(2):
        with open_store(pg_url) as store:
            assert store.engine.dialect.driver == "psycopg"
            with store.engine.connect() as conn:
                versions = [v for (v,) in conn.exec_driver_sql("SELECT version FROM schema_version ORDER BY 1")]
            assert versions == list(range(1, SCHEMA_VERSION + 1))
            assert {"runs", "layers", "records", "batches", "graphs", "series"} <= set(
                inspect(store.engine).get_table_names())


def test_round_trip_resume_and_nan_on_postgresql(pg_url: str) -> None:
    with open_store(pg_url) as store:
        info = RunInfo("pg", model="MLP", framework="torch", config={"lr": 0.1},
                       layers=[LayerInfo("fc1", "Linear", {"weight": [4, 3]})])
        assert store.start_run(info) == 0
        hist = np.array([1.0, 2.5, -3.0, np.inf])
        store.write("pg", [Record("pg", 0, "train", "fc1", "weights", "norm", 1.5),
                           Record("pg", 1, "train", "fc1", "weights", "norm", float("nan")),
                           Record("pg", 1, "train", "fc1", "weights", "histogram", hist)])
        with pytest.raises(RunExistsError, match="resume=True"):
            store.start_run(RunInfo("pg"))
    with open_store(pg_url) as store:
        assert store.start_run(RunInfo("pg"), resume=True) == 2
        df = store.load("pg")
        assert df["value"].iloc[0] == 1.5 and np.isnan(df["value"].iloc[1])
        arrays = store.load("pg", arrays=True)
        np.testing.assert_array_equal(arrays["value"].iloc[0], hist)
        assert store.layers("pg")["param_shapes"].tolist() == [{"weight": [4, 3]}]
        assert store.run_info("pg")["config"] == {"lr": 0.1}  # type: ignore[index]
        store.finish_run("pg", "failed")
        assert store.runs()["status"].tolist() == ["failed"]
