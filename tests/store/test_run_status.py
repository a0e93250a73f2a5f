"""Heartbeats: a running run whose writer went silent is shown ``stalled``; resuming it makes it running again.

The killed writer is real: a child process that probes a model with the store sink, is idle in
the middle of its run (a long step), and is SIGKILLed. The stall threshold and the heartbeat
interval are injected (a second, a fifth of one) so that nothing waits a minute.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import update

import sonde
from sonde.errors import ConfigError
from sonde.records import Record
from sonde.run_info import RunInfo
from sonde.sinks.store import StoreSink
from sonde.store import Store, open_store
from sonde.store.schema import SCHEMA_VERSION, runs
from sonde.store.status import STALL_AFTER, shown_status, stall_after_default

STALL = 1.0  # the injected threshold, seconds
BEAT = 0.2  # the injected heartbeat interval, seconds


def _age(store: Store, run: str, seconds: float) -> None:
    """Move the run's heartbeat ``seconds`` into the past, as if its writer had been silent that long."""
    with store.engine.connect() as conn, conn.begin():
        conn.execute(update(runs).where(runs.c.name == run).values(heartbeat_at=time.time() - seconds))


def _status(store: Store, run: str) -> tuple[str, str]:
    """The run's status as ``Store.runs`` and as ``Store.run_info`` show it (they must agree)."""
    listed = store.runs().set_index("name").loc[run, "status"]
    info = store.run_info(run)
    assert info is not None
    return str(listed), str(info["status"])


def test_the_rule() -> None:
    assert shown_status("running", 100.0, now=100.0 + STALL_AFTER) == "running"
    assert shown_status("running", 100.0, now=100.0 + STALL_AFTER + 1) == "stalled"
    assert shown_status("running", 100.0, now=160.0, stall_after=30.0) == "stalled"
    assert shown_status("running", None, now=1e12) == "running"
    for stored in ("finished", "failed"):
        assert shown_status(stored, 0.0, now=1e12) == stored


def test_the_threshold_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert stall_after_default() == STALL_AFTER == 60.0
    monkeypatch.setenv("SONDE_STALL_AFTER", "300")
    assert stall_after_default() == 300.0
    with open_store(tmp_path / "s.db") as store:
        assert store.stall_after == 300.0
    with open_store(tmp_path / "s.db", stall_after=2.5) as store:
        assert store.stall_after == 2.5
    for bad in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv("SONDE_STALL_AFTER", bad)
        with pytest.raises(ConfigError, match="SONDE_STALL_AFTER must be a positive number of seconds"):
            stall_after_default()


def test_silent_running_runs_are_stalled_and_beats_writes_and_resume_revive_them(any_store: Store) -> None:
    store = any_store
    store.start_run(RunInfo("r"), resume=False)
    store.start_run(RunInfo("done"), resume=False)
    store.finish_run("done", "finished")
    assert _status(store, "r") == ("running", "running")
    for run in ("r", "done"):
        _age(store, run, STALL_AFTER + 5)
    assert _status(store, "r") == ("stalled", "stalled")
    assert _status(store, "done") == ("finished", "finished")  # only running runs can stall
    assert store.run_infos()[0]["status"] == "stalled"
    store.heartbeat("r")
    assert _status(store, "r") == ("running", "running")
    _age(store, "r", STALL_AFTER + 5)
    store.write("r", [Record("r", 0, "train", "fc", "weights", "norm", 1.0)])  # a write is a sign of life
    assert _status(store, "r") == ("running", "running")
    _age(store, "r", STALL_AFTER + 5)
    before = store.run_info("r")
    assert before is not None and before["heartbeat_at"] < time.time() - STALL_AFTER
    assert store.start_run(RunInfo("r"), resume=True) == 1  # resumed where it stopped, running again
    assert _status(store, "r") == ("running", "running")
    with store.engine.connect() as conn:  # what is stored stays what the writer said
        assert conn.execute(runs.select().where(runs.c.name == "r")).one().status == "running"
    with pytest.raises(ConfigError, match="no run 'ghost'"):
        store.heartbeat("ghost")


def test_the_store_sink_beats_while_training_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    sink = StoreSink(path, heartbeat=BEAT)
    sink.open(RunInfo("r"))
    with open_store(path, stall_after=STALL) as reader:
        time.sleep(3 * STALL)  # one long step: nothing written, only heartbeats
        assert _status(reader, "r") == ("running", "running")
        sink.close("finished")
        beats = reader.run_info("r")["heartbeat_at"]  # type: ignore[index]
        time.sleep(2 * BEAT)
        assert reader.run_info("r")["heartbeat_at"] == beats  # type: ignore[index]  # no beat after close
        assert _status(reader, "r") == ("finished", "finished")


def test_a_store_written_before_heartbeats_is_migrated_with_its_last_update_as_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with open_store(path) as store:
        store.start_run(RunInfo("killed"), resume=False)
    with sqlite3.connect(path) as conn:  # as sonde wrote it before runs had a heartbeat (version 4)
        conn.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")
        conn.execute("UPDATE runs SET updated_at = updated_at - 3600")
        conn.execute("DELETE FROM schema_version WHERE version > 4")
    with open_store(path) as store:
        info = store.run_info("killed")
        assert info is not None and info["heartbeat_at"] == info["updated_at"]
        assert info["status"] == "stalled"  # its process is long gone
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 5


_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import sonde
    from sonde.sinks.store import StoreSink

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, run="r", optimizer=opt, store=None, every=1,
                     sinks=[StoreSink(sys.argv[1], heartbeat=float(sys.argv[2]), max_delay=0.05)]) as p:
        for step in range(3):
            loss = model(torch.randn(8, 3)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
        p.flush()
        print("trained", flush=True)
        time.sleep(600)  # a step that takes minutes: nothing to write, the heartbeat goes on
""")


def test_a_killed_run_is_stalled_and_resuming_it_runs_again(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(BEAT)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "trained", child.stderr.read() if child.stderr else ""
        with open_store(path, stall_after=STALL) as reader:
            time.sleep(3 * STALL)  # idle, but alive: its heartbeat keeps it running
            assert _status(reader, "r") == ("running", "running")
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            time.sleep(STALL + 5 * BEAT)
            assert _status(reader, "r") == ("stalled", "stalled")
            steps = reader.run_info("r")["steps"]  # type: ignore[index]  # the steps the probe had closed
            assert steps >= 2
            resumed = RunInfo("r", resume=True)
            sink = StoreSink(path, heartbeat=BEAT)
            sink.open(resumed)  # what sonde.probe(model, run="r", resume=True) does
            assert resumed.first_step == steps
            assert _status(reader, "r") == ("running", "running")
            time.sleep(2 * STALL)
            assert _status(reader, "r") == ("running", "running")
            sink.close("finished")
            assert _status(reader, "r") == ("finished", "finished")
            assert sonde.load(path, run="r", topics="loss")["step"].tolist() == list(range(steps))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
