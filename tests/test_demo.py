"""`sonde demo` end to end: store, TensorBoard events read back by TensorBoard, CSV, summary, dashboard."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sonde
from sonde.cli import main
from sonde.sinks.base import RunInfo
from sonde.store import open_store


def test_demo_records_to_every_sink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, logdir = tmp_path / "sonde.db", tmp_path / "runs"
    with open_store(store) as taken:  # a run of that name exists: the demo never mixes runs, it picks a new name
        taken.start_run(RunInfo("cnn-digits"))
    assert main(["demo", "--store", str(store), "--logdir", str(logdir), "--epochs", "1", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and str(store) in out

    frame = sonde.load(str(store))
    assert set(frame.run) == {"mlp-healthy", "mlp-lr-too-high", "cnn-digits-2"}
    assert list(frame.columns) == ["run", "step", "phase", "layer", "topic", "metric", "value"]
    assert {"train", "eval"} == set(frame.phase)
    loss = frame[(frame.run == "mlp-healthy") & (frame.metric == "loss") & (frame.phase == "train")]
    assert list(loss.step) == list(range(23))  # 1438 training images / batch 64

    events = EventAccumulator(str(logdir / "mlp-healthy"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(loss.step)
    assert [e.value for e in scalars] == pytest.approx(list(loss.value), rel=1e-6)
    assert "1/weights/histogram" in events.Tags()["histograms"]

    csv = pd.read_csv(logdir / "mlp-healthy" / "records.csv", keep_default_na=False)
    csv_loss = csv[(csv.metric == "loss") & (csv.phase == "train")]
    assert list(csv_loss.step) == list(loss.step)
    assert list(csv_loss.value.astype(float)) == pytest.approx(list(loss.value), rel=1e-12)


    # The demo shows trouble next to health: the too-high learning rate kills ReLU units that the
    # healthy run keeps alive (zero_frac of the two ReLU layers at the last step), and its loss stalls.
    train = frame[frame.phase == "train"]
    relu = train[(train.topic == "activations") & (train.metric == "zero_frac") & train.layer.isin(["2", "4"])]
    last = relu[relu.step == relu.step.max()].groupby("run")["value"].max()
    assert last["mlp-lr-too-high"] > last["mlp-healthy"] + 0.25
    losses = train[train.metric == "loss"].groupby("run")["value"]
    assert losses.last()["mlp-healthy"] < losses.first()["mlp-healthy"]
    assert losses.last()["mlp-lr-too-high"] > losses.last()["mlp-healthy"]
    assert "mlp-lr-too-high" in out and "most inactive layer: mlp-lr-too-high" in out
    # ... and the alerts say so, for that run only.
    alerts = sonde.load(str(store), metrics="alert", messages=True)
    assert set(alerts.run) == {"mlp-lr-too-high"}
    assert alerts.message.str.contains("dead units|updates too large").all()


def test_demo_serves_the_dashboard(tmp_path: Path) -> None:
    """``serve_dashboard`` answers the runs page and the API on its port, and stops when told."""
    import socket

    import httpx

    from sonde.demo import serve_dashboard
    from sonde.errors import ConfigError

    store = tmp_path / "sonde.db"
    open_store(store).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    dashboard = serve_dashboard(str(store), port=port)
    try:
        assert dashboard.url == f"http://127.0.0.1:{port}"
        page = httpx.get(dashboard.url + "/", headers={"accept": "text/html"}, timeout=10)
        assert page.status_code == 200 and "<title>Runs · sonde</title>" in page.text
        assert httpx.get(dashboard.url + "/api/v1/runs", timeout=10).json() == []
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*--port"):
            serve_dashboard(str(store), port=port)  # taken: a clear error, not a traceback from uvicorn
    finally:
        dashboard.stop()
    assert not dashboard.thread.is_alive()
