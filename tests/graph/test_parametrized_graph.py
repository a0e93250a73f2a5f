"""Parametrized modules (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, custom ones)
trace like the plain modules they parametrize: one atomic node each, the same edges and shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from sonde.graph.extract import graph


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.T) / 2


def plain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.Conv1d(1, 2, 3), nn.Linear(4, 4))


def parametrized(model: nn.Sequential) -> nn.Sequential:
    model = copy.deepcopy(model)
    parametrizations.weight_norm(model[0])
    parametrizations.spectral_norm(model[2])
    parametrizations.weight_norm(model[3], dim=0)
    parametrize.register_parametrization(model[4], "weight", Symmetric())
    return model


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model[2](model[1](model[0](x)))
    return model[4](model[3](h[:, None, :]))


class Net(nn.Module):
    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.layers, x)


@pytest.mark.parametrize("device", ["meta", "fake", "real"])
def test_a_parametrized_model_traces_like_the_plain_one(device: str) -> None:
    base = plain()
    x = torch.randn(3, 4)
    model = Net(parametrized(base))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected, got = graph(Net(base), x, device=device), graph(model, x, device=device)
    assert [(n.name, n.op, n.output_shapes) for n in got.nodes] == [
        (n.name, n.op, n.output_shapes) for n in expected.nodes]
    assert sorted(got.edges) == sorted(expected.edges)
    assert not [n.name for n in got.nodes if "parametrizations" in n.name]
    node = next(n for n in got.nodes if n.name == "layers.0")
    assert node.params == {"bias": [8], "parametrizations.weight.original0": [8, 1],
                           "parametrizations.weight.original1": [8, 4]}
    # the trace changed nothing of the model (spectral_norm's power-iteration buffers included)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
