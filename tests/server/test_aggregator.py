"""The aggregator role: whole steps to the frontend, exactly once, over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from sqlalchemy import text

from collect import Collect, key, stored
from nets import train_toy
from servers import Running
from sonde.server.aggregator import create_aggregator_app, group_id
from sonde.server.api.tensors import ServerMetric
from sonde.server.app import create_app
from sonde.sinks.remote import RemoteSink
from sonde.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "front.db") as s:
        yield s


@pytest.fixture
def frontend(store: Store) -> Iterator[Running]:
    running = Running(create_app(store, ui=False))
    yield running
    running.stop()


@pytest.fixture
def aggregator(frontend: Running) -> Iterator[Running]:
    running = Running(create_aggregator_app(frontend.url, group_delay=0.5))
    yield running
    running.stop()


def batches_at_frontend(store: Store, run: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM batches JOIN runs ON runs.id = batches.run_id WHERE runs.name = :run"),
            {"run": run}).scalar())


def post(url: str, run: str, batch_id: str, rows: list[list[Any]]) -> httpx.Response:
    body = msgpack.packb({"batch_id": batch_id, "records": rows})
    return httpx.post(f"{url}/api/v1/runs/{run}/records", content=body,
                      headers={"content-type": "application/msgpack"}, timeout=20)


def rows_for(step: int, layers: list[str]) -> list[list[Any]]:
    return [[step, "train", layer, "activations", metric, float(step + i)]
            for layer in layers for i, metric in enumerate(("mean", "std"))]


def post_stages(url: str, step: int, prefix: str = "") -> list[httpx.Response]:
    """Two pipeline stages of one model POST their halves of ``step`` at the same time."""
    answers: list[httpx.Response] = []
    stages = [threading.Thread(target=lambda b=b, layers=layers: answers.append(
        post(url, "r", f"{prefix}{b}{step}", rows_for(step, layers)))) for b, layers in (("a", ["0", "1"]),
                                                                                         ("b", ["2", "3"]))]
    for stage in stages:
        stage.start()
    for stage in stages:
        stage.join(30)
    return answers


def test_two_stages_of_one_step_reach_the_frontend_as_one_batch(frontend: Running, store: Store) -> None:
    aggregator = Running(create_aggregator_app(frontend.url, group_delay=1.0))
    try:
        assert httpx.post(f"{aggregator.url}/api/v1/runs", json={"name": "r"}).status_code == 201
        for step in range(3):
            assert [a.status_code for a in post_stages(aggregator.url, step)] == [200, 200]
            assert batches_at_frontend(store, "r") == step + 1  # one step, all four layers: one batch
        frame = store.load("r")
        assert sorted(frame.layer.unique()) == ["0", "1", "2", "3"] and len(frame) == 24
        # a replayed batch is recognised and stores nothing
        again = post(aggregator.url, "r", "a0", rows_for(0, ["0", "1"]))
        assert again.json() == {"accepted": 0, "duplicate": True}
        assert len(store.load("r")) == 24 and batches_at_frontend(store, "r") == 3
    finally:
        aggregator.stop()


def test_forwarded_ids_are_deterministic_so_a_second_aggregator_stores_nothing_twice(
        frontend: Running, store: Store) -> None:
    assert httpx.post(f"{frontend.url}/api/v1/runs", json={"name": "r"}).status_code == 201
    for _ in range(2):  # the same probe batch through two aggregator lives (a restart in between)
        running = Running(create_aggregator_app(frontend.url, group_delay=0.05))
        try:
            assert post(running.url, "r", "only", rows_for(0, ["0"]) + rows_for(1, ["0"])).status_code == 200
        finally:
            running.stop()
    assert len(store.load("r")) == 4 and batches_at_frontend(store, "r") == 2
    assert group_id("r", 0, ["b", "a"]) == group_id("r", 0, ["a", "b"]) != group_id("r", 1, ["a", "b"])


def train(url: str, tmp_path: Path, collect: Collect, steps: int, during: Any = None, metrics: Any = None,
          topics: Any = None) -> None:
    sink = RemoteSink(url, spill_dir=tmp_path / "spill", batch_records=1, max_delay=0.0, timeout=5.0,
                      drain_timeout=30.0)
    train_toy(steps, features=4, hidden=6, during=during, run="r", server=sink, sinks=[collect], metrics=metrics,
              topics=topics)


def test_a_probe_through_the_aggregator_survives_a_frontend_restart(tmp_path: Path, store: Store) -> None:
    front = Running(create_app(store, ui=False))
    port = front.port
    agg = Running(create_aggregator_app(front.url, group_delay=0.05))
    holder = {"front": front}
    collect = Collect()

    def during(step: int, p: Any) -> None:
        if step == 2:
            p.flush()
            holder["front"].stop()
        if step == 6:
            holder["front"] = Running(create_app(store, ui=False), port=port)

    try:
        train(agg.url, tmp_path, collect, 10, during)
    finally:
        agg.stop()
        holder["front"].stop()
    expected = sorted(key(r) for r in collect.records)
    got = sorted(stored(store, "r"))
    assert got == expected
    assert store.run_info("r")["status"] == "finished"


def test_tensors_and_run_calls_pass_through_to_the_right_role(aggregator: Running, frontend: Running,
                                                              tmp_path: Path, store: Store) -> None:
    collect = Collect()
    train(aggregator.url, tmp_path, collect, 3, metrics=["loss", ServerMetric("mean", sample=None)],
          topics=["activations", "loss"])
    evaluator = frontend.server.config.app.state.evaluator  # the frontend (role all) evaluates tensors itself
    assert evaluator.join(30)
    means = store.load("r", metrics="mean")
    assert sorted(zip(means.step, means.layer)) == [(s, layer) for s in range(3) for layer in ("0", "1", "2")]
    assert len(store.load("r", metrics="loss")) == 3
    listed = httpx.get(f"{aggregator.url}/api/v1/runs").json()  # reads go to the frontend
    assert [run["name"] for run in listed] == ["r"]
    bad = httpx.post(f"{aggregator.url}/api/v1/runs/r/records", content=b"\x01\x02",
                     headers={"content-type": "application/msgpack"})
    assert 400 <= bad.status_code < 500 and "error" in bad.json()


def test_messages_pass_through_the_aggregator_beside_six_element_rows(aggregator: Running, store: Store) -> None:
    assert httpx.post(f"{aggregator.url}/api/v1/runs", json={"name": "r"}).status_code == 201
    dead = "layer '1': 100% of its activations are exactly zero at step 1 (dead units; threshold 90%)"
    assert post(aggregator.url, "r", "old", rows_for(0, ["0", "1"])).status_code == 200  # 6-element rows
    alert = [1, "train", "1", "activations", "alert", 1.0, dead]
    assert post(aggregator.url, "r", "new", [*rows_for(1, ["0", "1"]), alert]).json() == {
        "accepted": 5, "duplicate": False}
    frame = store.load("r", messages=True)
    assert len(frame) == 9
    assert frame.loc[frame["metric"] == "alert", ["step", "layer", "value", "message"]].values.tolist() == [
        [1, "1", 1.0, dead]]
    assert (frame.loc[frame["metric"] != "alert", "message"] == "").all()
    bad = post(aggregator.url, "r", "bad", [[2, "train", "1", "activations", "alert", 1.0, 5]])
    assert bad.status_code == 422 and "message" in bad.json()["error"]
