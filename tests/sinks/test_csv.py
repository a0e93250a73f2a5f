"""CsvSink, read back with pandas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sonde.errors import StoreError
from sonde.records import Record
from sonde.sinks.base import RunInfo, SinkRunner
from sonde.sinks.csv import COLUMNS, CsvSink, format_value

RUN = "mlp"


def _read(path: Path) -> pd.DataFrame:
    # Network-wide records have an empty layer, which must stay "" rather than become NaN.
    return pd.read_csv(path, keep_default_na=False, dtype={"value": str})


def _records() -> list[Record]:
    return [
        Record(RUN, 0, "train", "", "loss", "loss", 2.302585092994046),
        Record(RUN, 0, "train", "fc1", "weights", "norm", 0.1),
        Record(RUN, 0, "train", "fc1", "activations", "zero_frac", float("nan")),
        Record(RUN, 1, "eval", "fc2", "output_grads", "mean", -1e-12),
        Record(RUN, 1, "train", "fc1", "weights", "histogram", np.array([0.0, 3.0, 12.0])),
        Record(RUN, 1, "train", "fc1", "weights", "histogram_edges", np.array([-1.5, 0.0, 1.0 / 3.0, 2.0])),
    ]


def test_rows_round_trip(tmp_path: Path) -> None:
    sink = CsvSink(directory=tmp_path)
    sink.open(RunInfo(name=RUN))
    records = _records()
    sink.write(records[:3])
    sink.write(records[3:])
    sink.close()

    path = tmp_path / RUN / "records.csv"
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    df = _read(path)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(records)
    for row, record in zip(df.itertuples(index=False), records):
        assert (row.run, row.step, row.phase, row.layer, row.topic, row.metric) == record[:6]
        got = np.array(str(row.value).split(), dtype=np.float64)
        expected = np.atleast_1d(np.asarray(record.value, dtype=np.float64))
        # Exact equality: the written text must round-trip every float, NaN included.
        np.testing.assert_array_equal(got, expected)
    assert df.loc[0, "layer"] == ""
    assert df.loc[4, "value"] == "0.0 3.0 12.0"


def test_scalar_column_reads_as_floats(tmp_path: Path) -> None:
    sink = CsvSink(directory=tmp_path)
    sink.open(RunInfo(name=RUN))
    losses = [2.5, 1.0 / 3.0, 0.1 + 0.2]
    sink.write([Record(RUN, s, "train", "", "loss", "loss", v) for s, v in enumerate(losses)])
    sink.close()
    df = pd.read_csv(tmp_path / RUN / "records.csv")
    assert df["value"].dtype == np.float64
    assert df["value"].tolist() == losses
    assert df["step"].tolist() == [0, 1, 2]


def test_resume_appends_without_a_second_header(tmp_path: Path) -> None:
    first = CsvSink(directory=tmp_path)
    first.open(RunInfo(name=RUN))
    first.write([Record(RUN, s, "train", "", "loss", "loss", float(s)) for s in range(3)])
    first.close()

    resumed = CsvSink(directory=tmp_path)
    resumed.open(RunInfo(name=RUN, resume=True, first_step=3))
    resumed.write([Record(RUN, s, "train", "", "loss", "loss", float(s)) for s in range(3, 5)])
    resumed.close()

    path = tmp_path / RUN / "records.csv"
    assert path.read_text().count("run,step") == 1
    df = pd.read_csv(path)
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    assert df["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_new_run_starts_the_file_afresh(tmp_path: Path) -> None:
    for value in (1.0, 2.0):
        sink = CsvSink(directory=tmp_path)
        sink.open(RunInfo(name=RUN))
        sink.write([Record(RUN, 0, "train", "", "loss", "loss", value)])
        sink.close()
    assert pd.read_csv(tmp_path / RUN / "records.csv")["value"].tolist() == [2.0]


def test_resume_of_a_missing_file_writes_the_header(tmp_path: Path) -> None:
    sink = CsvSink(directory=tmp_path)
    sink.open(RunInfo(name=RUN, resume=True))
    sink.write([Record(RUN, 9, "train", "", "loss", "loss", 0.5)])
    sink.close()
    df = pd.read_csv(tmp_path / RUN / "records.csv")
    assert list(df.columns) == list(COLUMNS)
    assert df["step"].tolist() == [9]


def test_flush_makes_rows_visible_before_close(tmp_path: Path) -> None:
    sink = CsvSink(directory=tmp_path)
    sink.open(RunInfo(name=RUN))
    sink.write([Record(RUN, 0, "train", "", "loss", "loss", 0.75)])
    sink.flush()
    assert pd.read_csv(tmp_path / RUN / "records.csv")["value"].tolist() == [0.75]
    sink.close()


def test_through_sink_runner(tmp_path: Path) -> None:
    sink = CsvSink(directory=tmp_path)
    sink.open(RunInfo(name=RUN))
    runner = SinkRunner(sink)
    for step in range(20):
        runner.submit([Record(RUN, step, "train", "fc1", "activations", "mean", step / 4)])
    runner.flush()
    assert len(pd.read_csv(tmp_path / RUN / "records.csv")) == 20
    runner.close()
    assert runner.failed is None


def test_unwritable_directory_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sink = CsvSink(directory=blocker / "sub")
    with pytest.raises(StoreError, match="cannot write CSV records to .*records.csv"):
        sink.open(RunInfo(name=RUN))


def test_format_value() -> None:
    assert format_value(0.1) == "0.1"
    assert format_value(float("inf")) == "inf"
    assert format_value(np.array([1.0, float("nan")])) == "1.0 nan"
