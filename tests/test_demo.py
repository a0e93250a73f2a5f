"""`sonde demo` end to end: store, TensorBoard events read back by TensorBoard, CSV, summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sonde
from sonde.cli import main


def test_demo_records_to_every_sink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, logdir = tmp_path / "sonde.db", tmp_path / "runs"
    assert main(["demo", "--store", str(store), "--logdir", str(logdir), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and str(store) in out

    frame = sonde.load(str(store))
    assert set(frame.run) == {"mlp-digits", "cnn-digits"}
    assert list(frame.columns) == ["run", "step", "phase", "layer", "topic", "metric", "value"]
    assert {"train", "eval"} == set(frame.phase)
    loss = frame[(frame.run == "mlp-digits") & (frame.metric == "loss") & (frame.phase == "train")]
    assert list(loss.step) == list(range(23))  # 1438 training images / batch 64

    events = EventAccumulator(str(logdir / "mlp-digits"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(loss.step)
    assert [e.value for e in scalars] == pytest.approx(list(loss.value), rel=1e-6)
    assert "1/weights/histogram" in events.Tags()["histograms"]

    csv = pd.read_csv(logdir / "mlp-digits" / "records.csv", keep_default_na=False)
    csv_loss = csv[(csv.metric == "loss") & (csv.phase == "train")]
    assert list(csv_loss.step) == list(loss.step)
    assert list(csv_loss.value.astype(float)) == pytest.approx(list(loss.value), rel=1e-12)

    # Running the demo again never mixes runs: new names are chosen.
    assert main(["demo", "--store", str(store), "--logdir", str(logdir), "--epochs", "1"]) == 0
    assert {"mlp-digits-2", "cnn-digits-2"} <= set(sonde.load(str(store)).run)
