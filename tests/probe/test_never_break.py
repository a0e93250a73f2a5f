"""No failure of monitoring stops training: a failure injected at each place the torch probe runs
code inside the user's step, eager and compiled, leaves the losses exactly those of the unprobed
run; each failing part is reported once (logger ``sonde``, ERROR, with its traceback) and then
switched off."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde import bus
from sonde.graph import job as graph_job
from sonde.probe import kit
from sonde.probe import torch as torch_probe

STEPS = 6


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure")


# where sonde runs code inside a step -> what to replace to make it fail there
INJECTIONS: dict[str, tuple[Any, str]] = {
    "layer forward pre-hook": (kit.CallNames, "__call__"),
    "layer forward hook (capture)": (torch_probe, "first_float_tensor"),
    "publishing a capture": (bus.Bus, "publish"),
    "output_grads tensor hook": (torch_probe.TorchProbe, "_unscaled"),
    "optimizer pre-step hook": (kit.ParameterPublisher, "before_step"),
    "optimizer post-step hook": (kit.ParameterPublisher, "after_step"),
    "installing the layer hooks": (torch_probe.TorchProbe, "_hook_layers"),
    "graph trace": (graph_job, "trace"),
    "flushing a step": (bus.Bus, "flush"),
}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(model: nn.Module, compiled: bool, probed: bool) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    call = torch.compile(model, backend="aot_eager") if compiled else model
    losses = []
    probe = sonde.probe(model, optimizer=opt, every=2, store=None, sinks=[Collect()]) if probed else None
    try:
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 5, generator=g), torch.randint(0, 2, (16,), generator=g)
            loss = nn.functional.cross_entropy(call(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if probe is not None:
                probe.log(loss=loss)
            losses.append(float(loss.detach()))
    finally:
        if probe is not None:
            probe.close()
    return losses


@pytest.mark.parametrize("execution", ["eager", "compiled"])
@pytest.mark.parametrize("where", list(INJECTIONS))
def test_training_completes_unchanged_when_monitoring_fails(
    where: str, execution: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    expected = _train(_net(), execution == "compiled", probed=False)
    owner, attribute = INJECTIONS[where]
    monkeypatch.setattr(owner, attribute, _boom)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="sonde"):
        got = _train(_net(), execution == "compiled", probed=True)
    assert got == expected  # bit for bit: the step ran as if unprobed
    reports = [r for r in caplog.records if (r.name == "sonde" and "injected failure" in r.getMessage())
               or (r.exc_info and "injected failure" in str(r.exc_info[1]))]
    assert reports, f"the failure at {where} was not reported"
    assert all(r.levelno >= logging.WARNING for r in reports)
    said = Counter(r.getMessage().split(" failed")[0] for r in reports)
    assert max(said.values()) == 1, f"a failing part was reported more than once: {said}"
