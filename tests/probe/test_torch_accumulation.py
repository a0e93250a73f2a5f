"""Gradient accumulation: N micro-batches and one optimizer step are one step, whose activations
(and output gradients) are those of the N micro-batches together and whose weight gradient is the
accumulated one, the gradient the step consumed. Expected values from an unprobed copy."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect

MICRO = 3


def stats(arrays: list[np.ndarray]) -> dict[str, float]:
    x = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    return {"mean": x.mean(), "std": x.std(), "max": x.max(), "norm": np.linalg.norm(x)}


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(MICRO)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    for x, y in micro_batches(step):
        (nn.functional.cross_entropy(model(x), y) / MICRO).backward()
    opt.step()
    opt.zero_grad()


def reference(model: nn.Sequential, steps: int) -> list[dict[tuple[str, str], dict[str, float]]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        acts: dict[str, list[np.ndarray]] = {"0": [], "1": [], "2": []}
        grads: dict[str, list[np.ndarray]] = {"0": [], "1": [], "2": []}
        for x, y in micro_batches(step):
            h = x
            for i, layer in enumerate(model):
                h = layer(h)
                acts[str(i)].append(h.detach().numpy().copy())
                h.register_hook(lambda g, sink=grads[str(i)]: sink.append(g.numpy().copy()))
            (nn.functional.cross_entropy(h, y) / MICRO).backward()
        found = {(k, "activations"): stats(v) for k, v in acts.items()}
        found.update({(k, "output_grads"): stats(v) for k, v in grads.items()})
        for i in (0, 2):
            found[(str(i), "weight_grads")] = stats([model[i].weight.grad.numpy()])  # accumulated over MICRO
        opt.step()
        opt.zero_grad()
        out.append(found)
    return out


def test_micro_batches_of_one_optimizer_step_are_one_step(collect: Collect) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    expected = reference(copy.deepcopy(model), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, metrics=["mean", "std", "max", "norm"], sinks=[collect],
                     topics=["activations", "output_grads", "weight_grads"]):
        for step in range(2):
            train_step(model, opt, step)
    assert sorted({r.step for r in collect.records}) == [0, 1]  # optimizer steps, not micro-batches
    for step, found in enumerate(expected):
        for (layer, topic), values in found.items():
            for metric, value in values.items():
                got: Any = collect.value(step=step, layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(value, rel=1e-5, abs=1e-8), (step, layer, topic, metric)
