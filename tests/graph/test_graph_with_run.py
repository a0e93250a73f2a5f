"""The probe builds the graph at the first forward, off the training thread, and sinks store it."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
import torch
from torch import nn

import sonde
from sonde.records import Record
from sonde.sinks import Sink
from sonde.store import open_store


class GraphCollect(Sink):
    name = "graph-collect"

    def __init__(self) -> None:
        self.graphs: list[dict[str, Any]] = []
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)

    def graph(self, graph: dict[str, Any]) -> None:
        self.graphs.append(graph)


def _train(model: nn.Module, probe_kw: dict[str, Any], steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, optimizer=opt, metrics=["mean"], **probe_kw):
        for _ in range(steps):
            loss = model(torch.randn(4, 6)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()


def test_probe_hands_the_graph_to_every_sink_once(tmp_path: Any) -> None:
    sink = GraphCollect()
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    _train(model, {"store": tmp_path / "s.db", "run": "g", "sinks": [sink]})
    assert len(sink.graphs) == 1
    graph = sink.graphs[0]
    assert [n["name"] for n in graph["nodes"]] == ["input", "0", "1", "2", "output"]
    assert graph["nodes"][1]["output_shapes"] == [[4, 5]]
    with open_store(tmp_path / "s.db") as store:
        assert store.get_graph("g") == graph
    # ... and the API serves it
    from sonde.server.app import create_app

    async def get() -> httpx.Response:
        app = create_app(tmp_path / "s.db", ui=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.get("/api/v1/runs/g/graph")

    response = asyncio.run(get())
    assert response.status_code == 200 and response.json() == graph
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_graph_that_cannot_be_built_never_breaks_training(caplog: pytest.LogCaptureFixture) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():  # the graph's trace runs under no_grad; training does not
                raise RuntimeError("not traceable")
            return self.fc(x)

    sink = GraphCollect()
    model = Odd()
    with caplog.at_level(logging.WARNING, logger="sonde"):
        _train(model, {"store": None, "sinks": [sink]})
    assert sink.graphs == []
    assert {r.step for r in sink.records} == {0, 1, 2}
    assert "the model graph could not be built" in caplog.text and "not traceable" in caplog.text


def test_a_sink_that_cannot_keep_the_graph_keeps_its_records(caplog: pytest.LogCaptureFixture) -> None:
    class Refuses(GraphCollect):
        def graph(self, graph: dict[str, Any]) -> None:
            raise OSError("disk full")

    sink = Refuses()
    with caplog.at_level(logging.ERROR, logger="sonde"):
        _train(nn.Sequential(nn.Linear(6, 1)), {"store": None, "sinks": [sink]})
    assert {r.step for r in sink.records} == {0, 1, 2}
    assert "could not record the model graph: OSError: disk full" in caplog.text


# Training on one thread while the graph is traced on fake tensors on another: the trace must read
# nothing but shapes, strides and dtypes from the live parameters. Converting them with
# FakeTensorMode.from_tensor walked each parameter's .grad while zero_grad freed it, a segmentation
# fault within about 30 traces (so this runs in a child process, where a crash is a failed test).
RACE = """
import threading, torch
from torch import nn
from sonde.graph.extract import trace
model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(40)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
stop = threading.Event()
def train():
    while not stop.is_set():
        model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
thread = threading.Thread(target=train); thread.start()
try:
    for _ in range(80):
        graph = trace(model, (torch.randn(4, 8),), {}, device="fake", background=True)
        assert graph.device == "fake" and len(graph.nodes) == 42, (graph.device, len(graph.nodes))
finally:
    stop.set(); thread.join()
print("traced")
"""


def test_fake_trace_on_a_training_model_reads_only_shapes() -> None:
    done = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "traced", (done.returncode, done.stderr[-2000:])
