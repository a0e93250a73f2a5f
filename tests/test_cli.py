"""`sonde replay`: what remote probes left on disk, sent from the command line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import sonde
from sonde.cli import main
from sonde.sinks import RemoteSink


def closed_port_url() -> str:
    with socket.socket() as s:  # a port nobody listens on: the server is down
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def spilled(spill: Path) -> list[str]:
    return sorted(f.name for f in spill.rglob("*.msgpack"))


def test_replay_without_a_spill_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "spill" in capsys.readouterr().err


def test_replay_keeps_the_spill_and_fails_while_the_server_is_still_down(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    spill = tmp_path / "spill"
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    sink = RemoteSink(url, spill_dir=spill, drain_timeout=0.0)
    with sonde.probe(model, run="offline", server=sink) as p:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            p.log(loss=loss)
    left_by_probe = spilled(spill)
    assert left_by_probe, "a probe whose server is down must leave its requests on disk"
    assert main(["replay", str(spill), "--server", url, "--timeout", "1"]) == 1
    assert "still waiting" in capsys.readouterr().out
    assert spilled(spill) == left_by_probe  # every request is still on disk (replay adopts the session dir)
