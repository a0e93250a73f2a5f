"""Remote runs keep a heartbeat too: the sink beats while training sends nothing; a killed probe's run stalls.

The server is the real app served by uvicorn in a thread; the probe is a child process that is
idle in the middle of its run (a long step) and then SIGKILLed. The stall threshold and the
heartbeat interval are injected so that nothing waits a minute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from servers import serving
from sonde.server.app import create_app
from sonde.store import Store, open_store
from sonde.store.schema import runs

STALL = 1.0  # the injected threshold, seconds
BEAT = 0.2  # the injected heartbeat interval, seconds

_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import sonde
    from sonde.sinks.remote import RemoteSink

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = RemoteSink(sys.argv[1], spill_dir=sys.argv[2], heartbeat=float(sys.argv[3]), max_delay=0.05)
    with sonde.probe(model, run="r", optimizer=opt, server=sink, every=1) as p:
        for step in range(3):
            loss = model(torch.randn(8, 3)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
        p.flush()
        print("trained", flush=True)
        time.sleep(600)  # a step that takes minutes: nothing to send, the heartbeat goes on
""")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with open_store(tmp_path / "server.db", stall_after=STALL) as s:
        yield s  # type: ignore[misc]


def _status(client: httpx.Client) -> tuple[str, str]:
    listed = {r["name"]: r["status"] for r in client.get("/api/v1/runs").json()}
    return listed["r"], client.get("/api/v1/runs/r").json()["status"]


def test_the_heartbeat_route_revives_a_silent_run(store: Store) -> None:
    with serving(create_app(store, ui=False)) as url, httpx.Client(base_url=url) as client:
        assert client.post("/api/v1/runs", json={"name": "r"}).status_code == 201
        with store.engine.connect() as conn, conn.begin():
            conn.execute(update(runs).values(heartbeat_at=time.time() - 10 * STALL))
        assert _status(client) == ("stalled", "stalled")
        beat = client.post("/api/v1/runs/r/heartbeat", json={})
        assert beat.status_code == 200 and beat.json() == {"name": "r"}
        assert _status(client) == ("running", "running")
        assert client.post("/api/v1/runs/ghost/heartbeat", json={}).status_code == 404


def test_a_remote_run_beats_while_idle_and_stalls_when_its_probe_is_killed(store: Store, tmp_path: Path) -> None:
    with serving(create_app(store, ui=False)) as url, httpx.Client(base_url=url) as client:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(tmp_path / "spill"), str(BEAT)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "trained", child.stderr.read() if child.stderr else ""
            time.sleep(3 * STALL)  # idle, but alive: its heartbeats keep it running
            assert _status(client) == ("running", "running")
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            time.sleep(STALL + 5 * BEAT)
            assert _status(client) == ("stalled", "stalled")
            steps = client.get("/api/v1/runs/r").json()["steps"]
            resumed = client.post("/api/v1/runs", json={"name": "r", "resume": True})
            assert resumed.status_code == 201 and resumed.json()["first_step"] == steps
            assert _status(client) == ("running", "running")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(30)
