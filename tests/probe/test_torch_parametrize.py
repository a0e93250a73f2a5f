"""Parametrized layers: ``weights`` is the effective weight the forward used (``module.weight``);
``weight_grads`` and ``weight_updates`` are of the parameters the optimizer steps (weight_norm's
``original0`` and ``original1`` together); the parametrization's own modules are not layers; the
graph is built. Expected values come from an unprobed copy of the model trained alike."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import sonde
from collect import Collect
from sonde.sinks import Sink


class CenteredColumns(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w - w.mean(dim=0, keepdim=True)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    parametrizations.weight_norm(m[0])
    parametrizations.spectral_norm(m[2])
    parametrize.register_parametrization(m[3], "weight", CenteredColumns())  # a custom parametrization
    return m


def stats(arrays: list[np.ndarray]) -> dict[str, float]:
    x = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    return {"mean": x.mean(), "max": x.max(), "norm": np.linalg.norm(x)}


def reference(m: nn.Sequential, data: list[torch.Tensor]) -> list[dict[tuple[str, str], dict[str, float]]]:
    """Per step, from an unprobed run: each parametrized layer's effective weight (the one the
    forward used, read from PyTorch's parametrization cache), and the gradients and updates of the
    parameters the optimizer steps."""
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    steps = []
    for x in data:
        found: dict[tuple[str, str], dict[str, float]] = {}
        with parametrize.cached():
            loss = m(x).square().mean()
            for i in (0, 2, 3):
                found[(str(i), "weights")] = stats([m[i].weight.detach().numpy()])
        loss.backward()
        originals = {i: list(m[i].parametrizations.parameters()) for i in (0, 2, 3)}
        before = {i: [p.detach().clone() for p in ps] for i, ps in originals.items()}
        for i, ps in originals.items():
            found[(str(i), "weight_grads")] = stats([p.grad.numpy() for p in ps])
        opt.step()
        opt.zero_grad()
        for i, ps in originals.items():
            found[(str(i), "weight_updates")] = stats([(p.detach() - b).numpy() for p, b in zip(ps, before[i])])
        steps.append(found)
    return steps


class Graphs(Sink):
    name = "graphs"

    def __init__(self) -> None:
        self.graphs: list[dict[str, Any]] = []

    def write(self, records: Any) -> None:
        pass

    def graph(self, graph: dict[str, Any]) -> None:
        self.graphs.append(graph)


def test_parametrized_layers_record_the_effective_weight_and_the_stepped_parameters(collect: Collect) -> None:
    m = model()
    data = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = reference(copy.deepcopy(m), data)
    graphs = Graphs()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with sonde.probe(m, store=None, optimizer=opt, metrics=["mean", "max", "norm"], sinks=[collect, graphs],
                     topics=["weights", "weight_grads", "weight_updates", "activations"]) as p:
        for x in data:
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert list(p.layers) == ["0", "1", "2", "3"]  # no parametrizations.weight.0 layers
    assert {r.layer for r in collect.records} == {"0", "1", "2", "3"}
    for step, found in enumerate(expected):
        for (layer, topic), values in found.items():
            for metric, value in values.items():
                got = collect.value(step=step, layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(value, rel=1e-5, abs=1e-8), (step, layer, topic, metric)
    # the effective weight is not the raw parameter: centred columns have mean 0, the raw one has not
    raw = m[3].parametrizations.weight.original.detach().double().mean().item()
    assert abs(raw) > 1e-3
    assert collect.value(step=2, layer="3", topic="weights", metric="mean") == pytest.approx(0.0, abs=1e-8)
    assert len(graphs.graphs) == 1
    assert [n["name"] for n in graphs.graphs[0]["nodes"]] == ["input", "0", "1", "2", "3", "output"]


def test_a_parametrized_model_trains_exactly_as_without_the_probe() -> None:
    m, twin = model(), model()
    data = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    losses = []
    for net, probed in ((m, True), (twin, False)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        run = []
        with sonde.probe(net, store=None, optimizer=opt, sinks=[Collect()]) if probed else contextlib.nullcontext():
            for x in data:
                loss = net(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]
    for a, b in zip(m.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)  # spectral_norm's power-iteration buffers included



def test_a_parametrized_module_inside_a_probed_block_gives_the_block_its_effective_weight(collect: Collect) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh()), nn.Linear(6, 2))
    parametrizations.weight_norm(net[0][0])
    g = net[0][0].parametrizations.weight.original0.detach().double().numpy()
    v = net[0][0].parametrizations.weight.original1.detach().double().numpy()
    effective = g * v / np.linalg.norm(v, axis=1, keepdims=True)  # weight_norm by hand, dim=0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with sonde.probe(net, store=None, optimizer=opt, depth=1, metrics=["norm"], sinks=[collect],
                     topics=["weights"]) as p:
        net(torch.randn(5, 4)).sum().backward()
        opt.step()
    assert list(p.layers) == ["0", "1"]
    got = collect.value(step=0, layer="0", topic="weights", metric="norm")
    assert got == pytest.approx(np.linalg.norm(effective), rel=1e-6)
    assert got != pytest.approx(np.linalg.norm(np.concatenate([g.ravel(), v.ravel()])), rel=1e-3)
