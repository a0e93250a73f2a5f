"""Server-side metrics: tensors shipped by a probe, run by the evaluator, checked against numpy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from starlette.testclient import TestClient
from torch import nn

import sonde
from servers import Running
from sonde.errors import ConfigError
from sonde.records import Record
from sonde.server.api.tensors import Mark, ServerMetric, TensorItem, decode_payload, encode_payload, shift_steps
from sonde.server.app import create_app
from sonde.server.evaluator import Evaluator, create_evaluator_app, evaluator_of, http_writer
from sonde.sinks.base import RunInfo
from sonde.sinks.remote import RemoteSink
from sonde.store import Store, open_store

URL = "http://testserver"
SPEC = [{"name": "stats", "kwargs": {}}]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(tmp_path / "server.db", ui=False)
    yield app
    evaluator = getattr(app.state, "evaluator", None)
    if evaluator is not None:
        evaluator.close()
    app.state.store.close()


def probe_and_train(app_client: Any, tmp_path: Path, metrics: list[Any], steps: int = 4,
                    log_outputs: bool = False, epoch: int | None = None,
                    every: int | None = 1) -> dict[tuple[int, str], np.ndarray]:
    """Train a small model with the probe reporting to the app (``p.end_epoch()`` every ``epoch``
    steps, ``every`` as sonde.probe takes it); return each layer's activations per step."""
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: dict[tuple[int, str], np.ndarray] = {}
    step = [0]
    for name, module in model.named_children():
        module.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__((step[0], name), out.detach().numpy().copy()))
    sink = RemoteSink(URL, client=app_client, spill_dir=tmp_path / "spill")
    with sonde.probe(model, run="r", server=sink, optimizer=opt, metrics=metrics, topics=["activations", "outputs"],
                     every=every) as p:
        for step[0] in range(steps):
            y = torch.randint(0, 3, (16,))
            out = model(torch.randn(16, 6))
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if log_outputs:
                p.log(outputs=out, labels=y)
                seen[(step[0], "labels")] = y.numpy().copy()
            if epoch and (step[0] + 1) % epoch == 0:
                p.end_epoch()
    return seen


def value(store: Store, layer: str, metric: str, step: int, topic: str = "activations") -> Any:
    frame = store.load("r", layers=layer, topics=topic, metrics=metric, arrays=metric.startswith("histogram"))
    rows = frame[frame.step == step]
    assert len(rows) == 1, f"expected one {layer}/{topic}/{metric} at step {step}, got {len(rows)}"
    return rows.value.iloc[0]


def test_server_side_stats_equal_numpy_on_the_shipped_rows(app: FastAPI, tmp_path: Path) -> None:
    client = TestClient(app, base_url=URL)
    seen = probe_and_train(client, tmp_path, [ServerMetric("stats", sample=5), ServerMetric("mean", sample=None)])
    assert evaluator_of(app).join(30)
    store = app.state.store
    for step in range(4):
        for layer in ("0", "1", "2"):
            full = seen[(step, layer)].astype(np.float64)
            rows = full[:5]
            assert value(store, layer, "std", step) == pytest.approx(rows.std(), rel=1e-5)
            assert value(store, layer, "max", step) == pytest.approx(rows.max(), rel=1e-6)
            assert value(store, layer, "norm", step) == pytest.approx(np.linalg.norm(rows), rel=1e-5)
            # the same metric name from the second ServerMetric is on all rows: a record of its own kind
    means = store.load("r", metrics="mean")
    assert len(means) == 2 * 4 * 3  # stats' mean on 5 rows, mean on all rows: both stored
    for step in range(4):
        pair = sorted(means[(means.step == step) & (means.layer == "2")].value)
        expected = sorted([seen[(step, "2")][:5].mean(), seen[(step, "2")].mean()])
        assert pair == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_server_metrics_on_layers_are_recorded_under_the_default_budget(app: FastAPI, tmp_path: Path) -> None:
    """Every ServerMetric is named ``server``: one of them on network-wide values (train_accuracy, a
    scalar the budget records every step) must not make the layer ones free of the layer hooks."""
    seen = probe_and_train(TestClient(app, base_url=URL), tmp_path,
                           [ServerMetric("mean", sample=None), ServerMetric("train_accuracy")],
                           steps=3, log_outputs=True, every=None)
    assert evaluator_of(app).join(30)
    means = app.state.store.load("r", layers="0", metrics="mean")
    assert list(means.step) == [0, 1, 2]  # the budget records the first steps in full
    for step in range(3):
        assert value(app.state.store, "0", "mean", step) == pytest.approx(float(seen[(step, "0")].mean()),
                                                                       rel=1e-5, abs=1e-7)


def test_histogram_edges_stay_fixed_across_steps_on_the_server(app: FastAPI, tmp_path: Path) -> None:
    seen = probe_and_train(TestClient(app, base_url=URL), tmp_path, [ServerMetric("histogram", bins=8, sample=None)])
    assert evaluator_of(app).join(30)
    store = app.state.store
    first = seen[(0, "1")].astype(np.float32).astype(np.float64)
    edges = np.linspace(first.min(), first.max(), 9)
    assert value(store, "1", "histogram_edges", 0) == pytest.approx(edges, rel=1e-6)
    for step in range(4):
        values = np.clip(seen[(step, "1")].astype(np.float32).astype(np.float64).ravel(), edges[0], edges[-1])
        counts, _ = np.histogram(values, bins=edges)
        assert value(store, "1", "histogram", step).tolist() == counts.tolist()


def test_compute_every_accumulates_and_labels_reach_the_metric(app: FastAPI, tmp_path: Path) -> None:
    seen = probe_and_train(TestClient(app, base_url=URL), tmp_path,
                           [ServerMetric("mean", compute_every=2, sample=None), ServerMetric("train_accuracy")],
                           steps=5, log_outputs=True)
    assert evaluator_of(app).join(30)
    store = app.state.store
    means = store.load("r", layers="0", metrics="mean")
    assert list(means.step) == [0, 2, 4]
    both = np.concatenate([seen[(1, "0")], seen[(2, "0")]])  # step 2's value covers steps 1 and 2
    assert value(store, "0", "mean", 2) == pytest.approx(both.mean(), rel=1e-5, abs=1e-7)
    for step in range(5):
        predicted = seen[(step, "2")].argmax(axis=1)
        expected = float((predicted == seen[(step, "labels")]).mean())
        assert value(store, "", "train_accuracy", step, topic="outputs") == pytest.approx(expected)


def mean_of(seen: dict[tuple[int, str], np.ndarray], layer: str, steps: range) -> float:
    return float(np.concatenate([seen[(step, layer)].astype(np.float32) for step in steps]).astype(np.float64).mean())


def test_state_not_computed_when_the_run_ends_gets_its_value_at_the_last_step(app: FastAPI, tmp_path: Path) -> None:
    # compute_every=3 over steps 0..4: values at 0 and 3, and at close, as the probe itself does,
    # a value at step 4 covering step 4 alone; then the run's instances are freed.
    seen = probe_and_train(TestClient(app, base_url=URL), tmp_path,
                           [ServerMetric("mean", compute_every=3, sample=None)], steps=5)
    evaluator = evaluator_of(app)
    assert evaluator.join(30)
    means = app.state.store.load("r", layers="0", metrics="mean")
    assert list(means.step) == [0, 3, 4]
    for step, steps in ((0, range(0, 1)), (3, range(1, 4)), (4, range(4, 5))):
        assert value(app.state.store, "0", "mean", step) == pytest.approx(mean_of(seen, "0", steps), rel=1e-5,
                                                                          abs=1e-7)
    assert not [key for key in evaluator._instances if key[0] == "r"]


def test_reset_epoch_is_honoured_on_the_server(app: FastAPI, tmp_path: Path) -> None:
    # Epochs of 3 steps: a value at each epoch's last step covering the whole epoch (and step 0,
    # which compute_every=1000 accepts, alone); the last epoch is cut short by the end of the run.
    seen = probe_and_train(TestClient(app, base_url=URL), tmp_path,
                           [ServerMetric("mean", compute_every=1000, reset="epoch", sample=None)], steps=8, epoch=3)
    assert evaluator_of(app).join(30)
    means = app.state.store.load("r", layers="2", metrics="mean")
    assert list(means.step) == [0, 2, 5, 7]
    for step, steps in ((0, range(0, 1)), (2, range(0, 3)), (5, range(3, 6)), (7, range(6, 8))):
        assert value(app.state.store, "2", "mean", step) == pytest.approx(mean_of(seen, "2", steps), rel=1e-5,
                                                                          abs=1e-7)


def test_marks_reach_only_their_metrics_and_bad_marks_are_refused(app: FastAPI) -> None:
    client = TestClient(app, base_url=URL)
    assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
    every = [{"name": "mean", "kwargs": {"compute_every": 10}}]
    tensor = np.arange(6, dtype=np.float32).reshape(3, 2)
    items: list[Any] = [TensorItem(step, "train", "fc", "activations", tensor + step, None, spec)
                        for step in (1, 2) for spec in (every, SPEC)]
    assert post(client, encode_payload("b1", items)).status_code == 202
    assert post(client, encode_payload("b2", [Mark("run_end", SPEC)])).status_code == 202  # stats: nothing pending
    assert evaluator_of(app).join(30)
    assert app.state.store.load("r", metrics="mean").step.tolist() == [1, 2]  # the stats' means, every step
    assert post(client, encode_payload("b3", [Mark("run_end", every)])).status_code == 202
    assert evaluator_of(app).join(30)
    means = app.state.store.load("r", metrics="mean")
    assert means.step.tolist() == [1, 2, 2]
    assert sorted(means[means.step == 2].value) == pytest.approx([4.0, 4.5])  # steps 1..2 pooled; step 2 alone
    bad = post(client, encode_payload("b4", [Mark("lunch", SPEC)]))
    assert bad.status_code == 422 and "mark must be one of 'epoch_end', 'run_end'" in bad.json()["error"]


def payload(step: int = 0, batch_id: str = "b1", spec: list[dict[str, Any]] | None = None) -> bytes:
    tensor = np.arange(12, dtype=np.float32).reshape(4, 3)
    return encode_payload(batch_id, [TensorItem(step, "train", "fc", "activations", tensor, None, spec or SPEC)])


def post(client: TestClient, body: bytes, run: str = "r") -> httpx.Response:
    return client.post(f"/api/v1/runs/{run}/tensors", content=body,
                       headers={"content-type": "application/octet-stream"})


def test_ingest_answers_at_once_and_refuses_bad_payloads_with_json(app: FastAPI) -> None:
    client = TestClient(app, base_url=URL)
    assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
    first = post(client, payload())
    assert first.status_code == 202 and first.json() == {"accepted": 1, "duplicate": False}
    assert post(client, payload()).json() == {"accepted": 0, "duplicate": True}
    assert evaluator_of(app).join(30)
    assert value(app.state.store, "fc", "mean", 0) == pytest.approx(5.5)
    cases = {
        b"not safetensors": (400, "safetensors"),
        payload(spec=[{"name": "no_such_metric", "kwargs": {}}]): (422, "unknown metric 'no_such_metric'"),
        payload(spec=[{"name": "histogram", "kwargs": {"colour": 1}}]): (422, "cannot be built"),
        payload(spec=[{"name": "update_ratio", "kwargs": {}}]): (422, "other metrics"),
        encode_payload("", [TensorItem(0, "train", "fc", "activations", np.ones(2), None, SPEC)]): (422, "batch_id"),
        encode_payload("b", [TensorItem(0, "train", "fc", "activations", np.ones((2, 1)), np.ones(3), SPEC)]):
            (422, "labels"),
    }
    for body, (status, message) in cases.items():
        response = post(client, body)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    missing = post(client, payload(), run="nobody")
    assert missing.status_code == 404 and "no run 'nobody'" in missing.json()["error"]


def test_a_slow_task_never_delays_ingest_and_a_full_queue_answers_503(tmp_path: Path) -> None:
    release = threading.Event()
    written: list[tuple[str, str, list[Record]]] = []

    def slow_write(run: str, batch_id: str, records: Any) -> None:
        release.wait(30)
        written.append((run, batch_id, list(records)))

    evaluator = Evaluator(slow_write, workers=1, max_queue=1)
    store = open_store(tmp_path / "e.db")
    store.start_run(RunInfo("r"))
    app = create_evaluator_app(store=store)
    app.state.evaluator.close()
    app.state.evaluator = evaluator
    client = TestClient(app, base_url=URL)
    assert post(client, payload(batch_id="a")).status_code == 202  # taken by the worker, which now blocks
    deadline = time.monotonic() + 10
    while evaluator._queues[0].qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert post(client, payload(batch_id="b")).status_code == 202  # waits in the queue
    full = post(client, payload(batch_id="c"))
    assert full.status_code == 503 and "full" in full.json()["error"]
    release.set()
    assert evaluator.join(30)
    assert len(written) == 2 and len({w[1] for w in written}) == 2
    evaluator.close()
    store.close()


def test_the_three_roles_over_http_frontend_forwards_tensors_to_the_evaluator(tmp_path: Path) -> None:
    frontend_store = open_store(tmp_path / "front.db")
    evaluator_holder: dict[str, Running] = {}
    frontend = Running(create_app(frontend_store, role="frontend", ui=False, evaluator_url="http://placeholder"))
    try:
        evaluator_holder["e"] = evaluator = Running(create_evaluator_app(frontend.url))
        frontend.server.config.app.state.evaluator_url = evaluator.url
        with httpx.Client(base_url=frontend.url) as client:
            assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
            answer = client.post("/api/v1/runs/r/tensors", content=payload(step=7),
                                 headers={"content-type": "application/octet-stream"})
            assert answer.status_code == 202, answer.text
            deadline = time.monotonic() + 20
            while frontend_store.load("r").empty and time.monotonic() < deadline:
                time.sleep(0.05)
        assert value(frontend_store, "fc", "mean", 7) == pytest.approx(5.5)
        assert value(frontend_store, "fc", "std", 7) == pytest.approx(np.arange(12).std())
    finally:
        for running in (*evaluator_holder.values(), frontend):
            running.stop()
        frontend_store.close()


def test_http_writer_stores_once_per_derived_batch_id(app: FastAPI) -> None:
    client = TestClient(app, base_url=URL)
    assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
    records = [Record("r", 3, "train", "fc", "activations", "mean", 1.25)]
    served = Running(app)
    try:
        write = http_writer(served.url)
        write("r", "x", records)
        write("r", "x", records)
    finally:
        served.stop()
    assert len(app.state.store.load("r")) == 1


def test_server_metrics_need_a_server_and_json_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown metric"):
        ServerMetric("no_such_metric")
    with pytest.raises(ConfigError, match="JSON"):
        ServerMetric("histogram", bins=object())
    with pytest.raises(ConfigError, match="sample="):
        ServerMetric("mean", sample=0)
    with pytest.raises(ConfigError, match="server="):
        sonde.probe(nn.Linear(2, 2), store=None, metrics=[ServerMetric("mean")])


def test_the_payload_round_trips() -> None:
    items = [TensorItem(2, "eval", "", "outputs", np.ones((3, 2)), np.array([0, 1, 1]), SPEC, "Conv2d")]
    batch_id, decoded = decode_payload(encode_payload("id", items))
    assert batch_id == "id" and decoded[0].labels.tolist() == [0, 1, 1] and decoded[0].phase == "eval"
    assert decoded[0].layer_type == "Conv2d" and decoded[0].tensor.tolist() == [[1.0, 1.0]] * 3
    assert decode_payload(shift_steps(encode_payload("id", items), 5))[1][0].step == 7
    batch_id, decoded = decode_payload(shift_steps(encode_payload("id", [Mark("epoch_end", SPEC), *items]), 1))
    assert decoded[0] == Mark("epoch_end", SPEC) and decoded[1].step == 3


def test_saturation_runs_on_the_server_like_delve_defines_it(app: FastAPI, tmp_path: Path) -> None:
    seen = probe_and_train(TestClient(app, base_url=URL), tmp_path,
                           [ServerMetric("saturation", sample=None, compute_every=1, threshold=0.9)], steps=3)
    assert evaluator_of(app).join(60)
    store = app.state.store
    for step in range(3):
        features = seen[(step, "0")].astype(np.float32).astype(np.float64)  # Linear: (batch, features)
        eig = np.clip(np.linalg.eigvalsh(np.cov(features.T, bias=True))[::-1], 0, None)
        k = int(np.argmax(np.cumsum(eig) / eig.sum() >= 0.9)) + 1
        assert value(store, "0", "intrinsic_dim", step) == k
        assert value(store, "0", "saturation", step) == pytest.approx(k / features.shape[1])
        assert value(store, "0", "cov_trace", step) == pytest.approx(eig.sum(), rel=1e-6)


def test_out_of_bound_metric_settings_are_refused_with_a_422_naming_the_bound(app: FastAPI) -> None:
    client = TestClient(app, base_url=URL)
    assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
    tiny = np.ones((2, 2), dtype=np.float32)
    cases = {
        "histogram": ({"bins": 10_000_000}, "Histogram(bins=) expects an integer from 1 to 4096; got 10000000"),
        "probe_f1": ({"samples": 10**9}, "ProbeF1(samples=) expects an integer from 8 to 100000"),
        "snapshot": ({"max_side": 10**6}, "Snapshot(max_side=) expects an integer from 1 to 256"),
        "saturation": ({"top_k": "all"}, "Saturation(top_k=) expects an integer"),
        "spectral_norm": ({"colour": 1}, "unexpected keyword argument 'colour'"),
    }
    for i, (name, (kwargs, message)) in enumerate(cases.items()):
        body = encode_payload(f"b{i}", [TensorItem(0, "train", "fc", "activations", tiny, None,
                                                   [{"name": name, "kwargs": kwargs}])])
        answer = post(client, body)
        assert answer.status_code == 422 and message in answer.json()["error"], answer.text
    many = [{"name": "mean", "kwargs": {}}] * 65
    answer = post(client, encode_payload("many", [TensorItem(0, "train", "fc", "activations", tiny, None, many)]))
    assert answer.status_code == 422 and "1 to 64" in answer.json()["error"]
    assert getattr(app.state, "evaluator", None) is None or evaluator_of(app).processed == 0  # nothing reached it
    assert app.state.store.load("r").empty


def test_an_empty_tensor_is_no_failure_of_any_server_side_metric(caplog: pytest.LogCaptureFixture) -> None:
    from sonde.metrics import registry

    written: list[Record] = []
    # cka_matrix compares layers of one pass (one layer here); test_accuracy needs a loader.
    usable = {n: cls for n, cls in registry().items() if not getattr(cls, "derived", False)
              and not cls.reads_topics and n not in ("cka_matrix", "test_accuracy")}
    items: list[Any] = []
    for topic in sorted({cls.topics[0] if cls.topics else "activations" for cls in usable.values()}):
        specs = [{"name": n, "kwargs": {}} for n, cls in sorted(usable.items())
                 if topic in cls.topics or (not cls.topics and topic == "activations")]
        items += [TensorItem(step, "train", "fc", topic, np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + step,
                             np.arange(rows) % 2, specs, "Linear") for step, rows in enumerate((4, 0, 4))]
        items.append(Mark("run_end", specs))
    evaluator = Evaluator(lambda run, batch_id, records: written.extend(records), workers=1)
    with caplog.at_level(logging.ERROR, logger="sonde.server"):
        assert evaluator.submit("r", "b", items) == "queued"
        assert evaluator.join(60)
        evaluator.close()
    assert [r.getMessage() for r in caplog.records] == []
    means = {r.step: r.value for r in written if r.metric == "mean" and r.topic == "activations"}
    assert means == {0: 5.5, 2: 7.5}  # the empty step records nothing
    assert {"histogram", "saturation", "spectral_norm", "snapshot"} <= {r.metric for r in written}
