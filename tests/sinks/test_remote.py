"""The remote sink against the real server app, in process: batching, spill, replay, bounded memory."""

from __future__ import annotations

import builtins
import contextlib
import errno
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from starlette.testclient import TestClient
from torch import nn

import sonde
from collect import Collect, key, stored
from nets import train_toy
from sonde.errors import ConfigError, RunExistsError
from sonde.metrics import DEFAULT_METRICS, Alerts
from sonde.records import Record
from sonde.server.api.tensors import ServerMetric
from sonde.server.app import create_app
from sonde.server.evaluator import evaluator_of
from sonde.sinks import outbox as outbox_module
from sonde.sinks.outbox import Entry
from sonde.sinks.remote import RemoteSink, encode_records, replay

URL = "http://testserver"


class Switch(httpx.BaseTransport):
    """A transport to the in-process app that can be down, lose acknowledgements, or hang."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.down = False
        self.lose_acks: dict[str, int] = {}  # path suffix -> how many responses to lose after serving
        self.gate = threading.Event()
        self.gate.set()
        self.paths: list[str] = []
        self.busy: set[str] = set()  # path suffixes answered 503 (a busy evaluator)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.gate.wait(30)
        if self.down:
            raise httpx.ConnectError("connection refused (test)", request=request)
        if any(request.url.path.endswith(suffix) for suffix in self.busy):
            return httpx.Response(503, json={"error": "the evaluator's queue is full (test)"})
        served = self.inner.handle_request(request)
        response = httpx.Response(served.status_code, headers=served.headers, content=served.read())
        self.paths.append(request.url.path)
        for suffix, left in self.lose_acks.items():
            if left and request.url.path.endswith(suffix):
                self.lose_acks[suffix] = left - 1
                raise httpx.ReadTimeout("response lost (test)", request=request)
        return response


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(tmp_path / "server.db", ui=False)
    yield app
    if getattr(app.state, "evaluator", None) is not None:
        app.state.evaluator.close()
    app.state.store.close()


@pytest.fixture
def switch(app: FastAPI) -> Switch:
    return Switch(TestClient(app, base_url=URL)._transport)


def sink_for(switch: Switch, tmp_path: Path, **kwargs: Any) -> RemoteSink:
    client = httpx.Client(transport=switch, base_url=URL)
    return RemoteSink(URL, client=client, spill_dir=tmp_path / "spill", **kwargs)


def train(sink: RemoteSink, collect: Collect, steps: int, *, run: str = "r", resume: bool = False,
          during: Any = None) -> None:
    train_toy(steps, hidden=5, during=during, run=run, server=sink, sinks=[collect], resume=resume)


def assert_exactly_once(app: FastAPI, run: str, collect: Collect) -> None:
    expected = sorted(key(r) for r in collect.records)
    got = stored(app.state.store, run)
    assert len(got) == len(expected), f"{len(got)} stored for {len(expected)} produced"
    assert sorted(got) == expected


def spill_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spill").glob("*/[0-9]*.msgpack"))


def test_records_arrive_once_in_batches_and_the_spill_is_cleaned(app: FastAPI, switch: Switch, tmp_path: Path,
                                                               collect: Collect) -> None:
    sink = sink_for(switch, tmp_path, batch_records=1000, max_delay=10.0)
    train(sink, collect, 12)
    assert len(collect.records) > 1000
    assert_exactly_once(app, "r", collect)
    posts = [p for p in switch.paths if p.endswith("/records")]
    assert 1 < len(posts) < 12  # several steps per batch: batched, not one request per step
    assert app.state.store.run_info("r")["status"] == "finished"
    assert not (tmp_path / "spill").exists()  # a clean session leaves nothing behind


def test_records_spill_while_the_server_is_down_and_arrive_once_when_it_is_back(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect) -> None:
    sink = sink_for(switch, tmp_path, batch_records=1, max_delay=0.0)
    seen: list[int] = []

    def during(step: int, p: Any) -> None:
        if step == 2:
            p.flush()
            switch.down = True
        if step == 8:
            p.flush()
            seen.append(len(spill_files(tmp_path)))
            switch.down = False

    train(sink, collect, 12, during=during)
    assert seen[0] >= 5  # steps 2..7 waited on disk
    assert_exactly_once(app, "r", collect)
    assert spill_files(tmp_path) == []


def test_lost_acknowledgements_are_replayed_without_duplicates(app: FastAPI, switch: Switch, tmp_path: Path,
                                                                collect: Collect) -> None:
    switch.lose_acks = {"/records": 3, "/runs": 1}  # the server stored them; the sink never heard back
    sink = sink_for(switch, tmp_path, batch_records=1, max_delay=0.0)
    train(sink, collect, 6)
    assert switch.lose_acks == {"/records": 0, "/runs": 0}
    assert_exactly_once(app, "r", collect)
    assert list(app.state.store.runs()["name"]) == ["r"]


def test_a_run_created_while_the_server_is_down_is_created_when_it_is_back(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect) -> None:
    switch.down = True

    def during(step: int, p: Any) -> None:
        if step == 3:
            switch.down = False

    train(sink_for(switch, tmp_path, batch_records=1, max_delay=0.0), collect, 6, during=during)
    assert_exactly_once(app, "r", collect)


def test_what_the_server_never_took_stays_on_disk_and_a_later_session_sends_it(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    switch.down = True
    train(sink_for(switch, tmp_path, drain_timeout=0.2), collect, 5)
    assert spill_files(tmp_path), "the spill must hold the run"
    assert "safe on disk" in caplog.text and str(tmp_path / "spill") in caplog.text
    assert not app.state.store.has_run("r")
    switch.down = False
    later = Collect()
    train(sink_for(switch, tmp_path), later, 3, run="other")  # adopts the abandoned session first
    assert_exactly_once(app, "r", collect)
    assert_exactly_once(app, "other", later)
    assert app.state.store.run_info("r")["status"] == "finished"
    assert spill_files(tmp_path) == []


def test_replay_sends_abandoned_spills_without_a_probe(app: FastAPI, switch: Switch, tmp_path: Path,
                                                       collect: Collect) -> None:
    switch.down = True
    train(sink_for(switch, tmp_path, drain_timeout=0.0), collect, 4)
    switch.down = False
    left = replay(tmp_path / "spill", URL, client=httpx.Client(transport=switch, base_url=URL))
    assert left == 0
    assert_exactly_once(app, "r", collect)
    with pytest.raises(ConfigError, match="no spill directory"):
        replay(tmp_path / "nowhere")


def test_a_resumed_run_started_offline_continues_after_its_last_step(app: FastAPI, switch: Switch,
                                                                    tmp_path: Path) -> None:
    first, second = Collect(), Collect()
    train(sink_for(switch, tmp_path), first, 4)
    switch.down = True

    def during(step: int, p: Any) -> None:
        if step == 1:
            switch.down = False

    train(sink_for(switch, tmp_path), second, 3, resume=True, during=during)
    steps = sorted(set(app.state.store.load("r").step))
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    shifted = [r._replace(step=r.step + 4) for r in second.records]
    assert sorted(stored(app.state.store, "r")) == sorted(key(r) for r in first.records + shifted)


def test_memory_stays_bounded_while_the_server_hangs(app: FastAPI, switch: Switch, tmp_path: Path,
                                                      collect: Collect) -> None:
    bound = 4096
    sink = sink_for(switch, tmp_path, batch_records=1, max_delay=0.0, max_memory_bytes=bound)
    peaks: list[int] = []

    def during(step: int, p: Any) -> None:
        if step == 1:
            p.flush()
            switch.gate.clear()  # the server hangs: requests block, nothing fails
        if step > 1:
            sink.write([])
            assert sink.outbox is not None
            peaks.append(sink.outbox._memory_bytes)
        if step == 10:
            assert len(spill_files(tmp_path)) >= 5  # past the bound, batches went to disk
            switch.gate.set()

    train(sink, collect, 14, during=during)
    assert max(peaks) <= bound
    assert_exactly_once(app, "r", collect)


def test_a_taken_run_name_or_a_refused_token_fails_at_probe_time(app: FastAPI, switch: Switch,
                                                                  tmp_path: Path, collect: Collect) -> None:
    train(sink_for(switch, tmp_path), collect, 1)
    with pytest.raises(RunExistsError, match="already exists"):
        train(sink_for(switch, tmp_path), Collect(), 1)
    guarded = create_app(tmp_path / "guarded.db", ui=False, token="s3cret")
    client = TestClient(guarded, base_url=URL)
    with pytest.raises(sonde.StoreError, match="401"):
        train(RemoteSink(URL, client=client, spill_dir=tmp_path / "spill2"), Collect(), 1)
    train(RemoteSink(URL, client=client, token="s3cret", spill_dir=tmp_path / "spill2"), Collect(), 2, run="ok")
    assert guarded.state.store.has_run("ok")


def test_records_overtake_tensors_the_evaluator_cannot_take_yet(app: FastAPI, switch: Switch,
                                                                  tmp_path: Path) -> None:
    switch.busy = {"/tensors"}
    losses: list[int] = []

    def during(step: int, p: Any) -> None:
        if step == 4:
            deadline = time.monotonic() + 20
            while len(app.state.store.load("r", metrics="loss")) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            losses.append(len(app.state.store.load("r", metrics="loss")))
            switch.busy = set()

    collect = Collect()
    sink = sink_for(switch, tmp_path, batch_records=1, max_delay=0.0)
    model = nn.Sequential(nn.Linear(3, 4))
    with sonde.probe(model, run="r", server=sink, sinks=[collect], topics=["activations", "loss"],
                     metrics=["loss", ServerMetric("mean", sample=None)]) as p:
        for step in range(6):
            p.log(loss=model(torch.randn(5, 3)).pow(2).mean())
            during(step, p)
    assert losses == [4]  # steps 0..3 stored while their tensors waited
    assert evaluator_of(app).join(30)
    assert sorted(app.state.store.load("r", metrics="mean").step) == list(range(6))


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="http"):
        RemoteSink("127.0.0.1:8080")
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="server="):
        sonde.probe(model, store=None, metrics=[ServerMetric("mean")])


def test_encoded_records_are_the_contract_body() -> None:
    body = encode_records("b", [Record("r", 3, "train", "fc", "weights", "histogram", np.array([1.0, 2.0])),
                                Record("r", 3, "eval", "", "loss", "loss", 0.5)])
    assert msgpack.unpackb(body) == {"batch_id": "b", "records": [
        [3, "train", "fc", "weights", "histogram", [1.0, 2.0]], [3, "eval", "", "loss", "loss", 0.5]]}


def test_alert_messages_reach_the_server_store_as_a_local_store_keeps_them(app: FastAPI, switch: Switch,
                                                                        tmp_path: Path, collect: Collect) -> None:
    def dead_run(**where: Any) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            model[0].bias.fill_(-100.0)  # the ReLU is dead from the start
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with sonde.probe(model, run="dead", optimizer=opt, metrics=[*DEFAULT_METRICS, Alerts(warmup=1)], **where):
            for _ in range(4):
                model(torch.randn(16, 8)).sum().backward()
                opt.step()
                opt.zero_grad()

    dead_run(server=sink_for(switch, tmp_path), sinks=[collect])
    dead_run(store=tmp_path / "local.db")
    sent = [r for r in collect.records if r.metric == "alert"]
    assert [(r.step, r.layer) for r in sent if r.topic == "activations"] == [(1, "1")]
    assert all(r.message for r in sent)
    remote = app.state.store.load("dead", metrics="alert", messages=True)
    assert sorted(zip(remote["step"], remote["layer"], remote["topic"], remote["message"])) == sorted(
        (r.step, r.layer, r.topic, r.message) for r in sent)
    assert remote["message"].str.startswith("layer '").all()
    local = sonde.load(tmp_path / "local.db", run="dead", metrics="alert", messages=True)
    assert local.equals(remote)  # the very frame a local StoreSink leaves
    others = app.state.store.load("dead", metrics="zero_frac", messages=True)
    assert len(others) > 0 and (others["message"] == "").all()


class SmallDisk:
    """The spill directory on a filesystem of ``capacity`` bytes: a write past that fails part-way with ENOSPC."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root, self.capacity = root, capacity
        self.refused = 0

    def used(self) -> int:
        total = 0
        for path in self.root.rglob("*"):
            with contextlib.suppress(OSError):  # the sender removes what the server took
                total += path.stat().st_size if path.is_file() else 0
        return total

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = builtins.open(file, mode, *args, **kwargs)
        return _CappedFile(opened, self) if "w" in mode or "a" in mode else opened


class _CappedFile:
    def __init__(self, file: Any, disk: SmallDisk) -> None:
        self._file, self._disk = file, disk

    def write(self, data: bytes) -> int:
        room = self._disk.capacity - self._disk.used()
        if len(data) > room:
            self._file.write(data[:max(room, 0)])
            self._file.flush()  # what fitted takes the room, as on a real disk
            self._disk.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        written: int = self._file.write(data)
        return written

    def __enter__(self) -> _CappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def small_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capacity: int) -> SmallDisk:
    disk = SmallDisk(tmp_path / "spill", capacity)
    monkeypatch.setattr(outbox_module, "open", disk.open, raising=False)
    return disk


def test_a_full_spill_disk_keeps_requests_in_memory_and_sends_them_when_the_server_is_back(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    disk = small_disk(monkeypatch, tmp_path, capacity=60_000)  # the run, its graph and two steps
    sink = sink_for(switch, tmp_path, batch_records=1, max_delay=0.0)
    waiting: list[tuple[int, int]] = []

    def during(step: int, p: Any) -> None:
        if step == 1:
            p.flush()
            switch.down = True
        if step == 12:
            p.flush()
            assert sink.outbox is not None
            waiting.append(sink.outbox.pending())
            switch.down = False

    train(sink, collect, 16, during=during)
    in_memory, on_disk = waiting[0]
    assert disk.refused and on_disk > 0 and in_memory > 0  # the disk filled up; the rest waited in memory
    assert "keeping requests in memory" in caplog.text
    assert_exactly_once(app, "r", collect)  # every step arrived once the server was back
    assert spill_files(tmp_path) == []
    assert "were lost" not in caplog.text and "DROPPED" not in caplog.text


def test_past_the_memory_budget_a_full_disk_drops_requests_counted_and_replay_sends_the_rest(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    disk = small_disk(monkeypatch, tmp_path, capacity=60_000)
    switch.down = True  # for the whole run: what neither the disk nor memory holds cannot be kept
    sink = sink_for(switch, tmp_path, batch_records=1, max_delay=0.0, max_memory_bytes=50_000, drain_timeout=0.0)
    train(sink, collect, 12)
    assert "DROPPED" in caplog.text
    found = re.search(r"(\d+) request\(s\) for server \S+, with (\d+) Records, were lost", caplog.text)
    assert found is not None, caplog.text
    lost = int(found[2])
    assert 0 < lost < len(collect.records)
    disk.capacity = disk.used()  # the disk is now full to the last byte: replay must still run
    switch.down = False
    assert replay(tmp_path / "spill", URL, client=httpx.Client(transport=switch, base_url=URL)) == 0
    assert len(stored(app.state.store, "r")) + lost == len(collect.records)  # counted, never silently dropped
    assert not (tmp_path / "spill").exists()  # no session directory left behind


def test_requests_the_server_rejects_are_set_aside_from_memory_too(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[int] = []

    def during(step: int, p: Any) -> None:
        if step == 2:
            p.flush()
            delivered.append(len(stored(app.state.store, "r")))
            app.state.store.delete_run("r")  # deleted on the server while training goes on: 404 from now on

    train(sink_for(switch, tmp_path, batch_records=1, max_delay=0.0), collect, 6, during=during)
    aside = [Entry.unpack(0, f.read_bytes(), f) for f in sorted((tmp_path / "spill" / "rejected").glob("*.msgpack"))]
    rows = [row for e in aside if e.kind == "records" for row in msgpack.unpackb(e.body)["records"]]
    assert delivered[0] + len(rows) == len(collect.records)
    assert {e.kind for e in aside} >= {"records", "finish"}
    assert caplog.text.count("; set aside in") == len(aside)


def test_a_rejected_request_that_cannot_be_set_aside_is_reported_lost_with_its_count(
        app: FastAPI, switch: Switch, tmp_path: Path, collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / "rejected").write_text("not a directory")
    delivered: list[int] = []

    def during(step: int, p: Any) -> None:
        if step == 2:
            p.flush()
            delivered.append(len(stored(app.state.store, "r")))
            app.state.store.delete_run("r")

    train(sink_for(switch, tmp_path, batch_records=1, max_delay=0.0), collect, 6, during=during)
    assert "; set aside in" not in caplog.text
    lost = sum(int(n) for n in re.findall(r"could not be set aside .*: its (\d+) Records are lost", caplog.text))
    assert delivered[0] + lost == len(collect.records)
