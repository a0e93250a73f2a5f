"""Server-side metrics run on the probe's MetricEngine: their Records raise alerts, stored with the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from starlette.testclient import TestClient
from torch import nn

import sonde
from sonde.metrics import ServerMetric
from sonde.server.app import create_app
from sonde.server.evaluator import evaluator_of
from sonde.sinks.remote import RemoteSink
from sonde.wire import TensorItem, encode_payload

URL = "http://testserver"
ZERO_FRAC = [{"name": "zero_frac", "kwargs": {}}]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(tmp_path / "server.db", ui=False)
    yield app
    evaluator = getattr(app.state, "evaluator", None)
    if evaluator is not None:
        evaluator.close()
    app.state.store.close()


def post(client: TestClient, body: bytes) -> int:
    return client.post("/api/v1/runs/r/tensors", content=body,
                       headers={"content-type": "application/octet-stream"}).status_code


def test_a_server_side_metric_raises_an_alert_that_reaches_the_store(app: FastAPI) -> None:
    client = TestClient(app, base_url=URL)
    assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
    healthy = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    dead = np.zeros((4, 3), dtype=np.float32)
    dead[0, 0] = 1.0  # 11 of 12 activations exactly zero: 92% > the dead-unit threshold of 90%
    items = [TensorItem(step, "train", "fc", "activations", tensor, None, ZERO_FRAC)
             for step, tensor in ((150, healthy), (151, dead), (152, dead))]  # after the 100-step warmup
    assert post(client, encode_payload("b1", items)) == 202
    assert evaluator_of(app).join(30)
    frame = app.state.store.load("r", metrics="alert", messages=True)
    assert frame.step.tolist() == [151]  # the onset only, as on the probe
    assert frame.layer.tolist() == ["fc"] and frame.topic.tolist() == ["activations"]
    assert "92% of its activations are exactly zero at step 151" in frame.message.iloc[0]
    zero = app.state.store.load("r", metrics="zero_frac")
    assert zero.value.tolist() == pytest.approx([0.0, 11 / 12, 11 / 12])


def test_non_finite_values_shipped_by_a_probe_raise_the_nan_alert_on_the_server(app: FastAPI, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sink = RemoteSink(URL, client=TestClient(app, base_url=URL), spill_dir=tmp_path / "spill")
    # No alerts on the probe: the one alert comes from the server's evaluator.
    with sonde.probe(model, run="r", server=sink, metrics=[ServerMetric("stats", sample=None)],
                     topics=["activations"]):
        for step in range(3):
            x = torch.randn(8, 4)
            if step == 1:
                x[0, 0] = float("nan")
            model(x)
    assert evaluator_of(app).join(30)
    frame = app.state.store.load("r", metrics="alert", messages=True)
    # One alert for the episode; which layer it names depends on which worker shard got there first
    # (the layers' series run on different shards), so only the step is certain.
    assert len(frame) == 1 and frame.step.tolist() == [1] and frame.layer.iloc[0] in ("0", "1")
    assert frame.message.iloc[0].startswith("NaN/Inf first appeared at step 1 in layer")
