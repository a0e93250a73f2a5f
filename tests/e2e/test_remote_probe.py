"""A real ``sonde serve`` is killed and restarted while a probed model trains against it.

Training goes on while the server is gone (the spill directory grows), and after the restart
every Record the probe produced is in the store exactly once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import sonde
from sonde.records import Record
from sonde.sinks import Sink
from sonde.sinks.remote import RemoteSink
from sonde.store import open_store


class Collect(Sink):
    """Keeps every Record the probe produced (what the server must end up with)."""

    name = "collect"

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``sonde serve`` in a subprocess, on a fixed port and store, that can be killed and started again."""

    def __init__(self, store: Path, port: int, log: Path) -> None:
        self.store, self.port, self.log = store, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SONDE_TOKEN", None)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sonde.cli", "serve", "--port", str(self.port), "--store", str(self.store)],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"sonde serve exited: {self.log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/api/v1/runs", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"sonde serve did not answer within 30 s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)  # no goodbye: in-flight requests die with it
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server.db", free_port(), tmp_path / "serve.log")
    srv.start()
    yield srv
    srv.stop()


def key(run: str, row: Any) -> tuple[Any, ...]:
    step, phase, layer, topic, metric, value = row
    value = tuple(np.round(value, 9)) if isinstance(value, np.ndarray) else round(float(value), 9)
    return (int(step), phase, layer, topic, metric, value)


def test_records_survive_a_server_killed_and_restarted_mid_training(server: Server, tmp_path: Path) -> None:
    collect = Collect()
    spill = tmp_path / "spill"
    sink = RemoteSink(server.url, spill_dir=spill, batch_records=500, max_delay=0.05, timeout=2.0,
                      drain_timeout=30.0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    spilled: list[int] = []

    def spill_files() -> int:
        return len(list(spill.glob("*/[0-9]*.msgpack")))

    steps = 60
    with sonde.probe(model, run="killed", server=sink, optimizer=opt, sinks=[collect]) as p:
        for step in range(steps):
            x = torch.randn(32, 16)
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (32,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
            if step == 15:
                server.kill()
            if step == 25:
                spilled.append(spill_files())
            if step == 40:
                spilled.append(spill_files())
                server.start()  # same store, same port
    assert spilled[0] > 0, "Records must wait on disk while the server is away"
    assert spilled[1] > spilled[0], "the spill grows while training goes on without a server"
    assert spill_files() == 0, "everything was delivered after the restart"

    expected = sorted(key("killed", (r.step, r.phase, r.layer, r.topic, r.metric, r.value))
                      for r in collect.records)
    assert {r.step for r in collect.records} == set(range(steps))
    with open_store(server.store, create=False) as store:
        rows = [key("killed", row[1:]) for arrays in (False, True)
                for row in store.load("killed", arrays=arrays).itertuples(index=False, name=None)]
        status = store.run_info("killed")["status"]
    assert len(rows) == len(expected), f"{len(rows)} stored for {len(expected)} produced"
    assert sorted(rows) == expected
    assert status == "finished"
