"""A real ``sonde serve`` is killed and restarted while a probed model trains against it.

Training goes on while the server is gone (the spill directory grows), and after the restart
every Record the probe produced is in the store exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import sonde
from collect import Collect, key, stored
from servers import SondeServe
from sonde.sinks.remote import RemoteSink
from sonde.store import open_store


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SondeServe]:
    with SondeServe.running(tmp_path / "server.db", tmp_path / "serve.log") as srv:
        yield srv


def test_records_survive_a_server_killed_and_restarted_mid_training(server: SondeServe, tmp_path: Path) -> None:
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
    with sonde.probe(model, run="killed", server=sink, optimizer=opt, sinks=[collect], every=1) as p:
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

    expected = sorted(key(r) for r in collect.records)
    assert {r.step for r in collect.records} == set(range(steps))
    with open_store(server.store, create=False) as store:
        rows = stored(store, "killed")
        status = store.run_info("killed")["status"]
    assert len(rows) == len(expected), f"{len(rows)} stored for {len(expected)} produced"
    assert sorted(rows) == expected
    assert status == "finished"
