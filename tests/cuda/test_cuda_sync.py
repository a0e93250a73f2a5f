"""On a CUDA GPU: a probed training loop causes no host synchronisation, and its values match.

These tests need a CUDA device and are skipped, with that reason, where there is none. Run them
in one go with ``benchmarks/gpu_check.sh`` (or
``.venv/bin/python -m pytest -q -rs tests/cuda -p no:cacheprovider``).

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call (``.item()``,
``.cpu()`` of a device tensor, ``.tolist()``, ``torch.cuda.synchronize()``, a blocking copy to
pageable memory) raise. sonde catches its own failures and switches that part of monitoring off,
so the first test checks both that training ran and that sonde logged no failure and recorded
every step.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.metrics import Saturation
from sonde.metrics.registry import DEFAULT_METRICS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

STEPS = 5


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


@pytest.fixture
def exact_matmuls() -> Iterator[None]:
    """float32 matmuls without TF32, so that CUDA and CPU values agree to float32 rounding."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def train(model: nn.Sequential, device: str, collect: Collect, *, steps: int = STEPS, autocast: bool = False,
          sync_debug: bool = False, **probe_kwargs: Any) -> tuple[list[float], list[np.ndarray]]:
    """Train ``model`` on ``device`` under a probe (every step recorded); returns each step's loss
    and the first layer's weight as the step's forward used it, both read after the probe closed."""
    model = model.to(device)
    first = model[0]
    assert isinstance(first, nn.Linear)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 32, generator=generator).to(device), torch.randint(0, 10, (16,), generator=generator)
                .to(device)) for _ in range(steps)]
    losses: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    with sonde.probe(model, store=None, optimizer=opt, every=1, sinks=[collect], **probe_kwargs) as p:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in batches:
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                    out = model(x)
                    loss = nn.functional.cross_entropy(out.float(), y)
                opt.zero_grad()
                loss.backward()
                weights.append(first.weight.detach().clone())
                opt.step()
                p.log(loss=loss, labels=y, outputs=out)
                losses.append(loss.detach())
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)
    return [float(v) for v in losses], [w.double().cpu().numpy() for w in weights]


@pytest.mark.parametrize("metrics", [None, [*DEFAULT_METRICS, "spectral_norm"]], ids=["default", "offloaded"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recorded_steps_cause_no_host_synchronisation(metrics: list[str] | None, autocast: bool,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    collect = Collect()
    with caplog.at_level(logging.WARNING, logger="sonde"):
        losses, weights = train(mlp(), "cuda", collect, autocast=autocast, sync_debug=True, metrics=metrics)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert problems == [], problems  # a synchronising call inside sonde would be caught and logged here
    assert sorted({r.step for r in collect.find(metric="loss")}) == list(range(STEPS))
    for step in range(STEPS):
        assert collect.value(metric="loss", step=step) == pytest.approx(losses[step], rel=1e-6)
        w = weights[step]
        assert collect.value(metric="mean", layer="0", topic="weights", step=step) == pytest.approx(w.mean(), rel=1e-5)
        assert collect.value(metric="norm", layer="0", topic="weights", step=step) == pytest.approx(
            np.linalg.norm(w), rel=1e-5)
        for topic in ("activations", "weight_grads", "weight_updates"):
            assert collect.find(metric="std", layer="2", topic=topic, step=step), (topic, step)
        if metrics is not None:
            assert collect.value(metric="spectral_norm", layer="0", step=step) == pytest.approx(
                np.linalg.svd(w, compute_uv=False)[0], rel=1e-4)


def test_values_on_cuda_match_the_cpu_computation(exact_matmuls: None) -> None:
    model = mlp()
    on_cpu, on_cuda = Collect(), Collect()
    cpu_losses, cpu_weights = train(copy.deepcopy(model), "cpu", on_cpu)
    cuda_losses, cuda_weights = train(copy.deepcopy(model), "cuda", on_cuda)
    assert cuda_losses == pytest.approx(cpu_losses, rel=1e-4)
    for w_cpu, w_cuda in zip(cpu_weights, cuda_weights, strict=True):
        np.testing.assert_allclose(w_cuda, w_cpu, rtol=1e-4, atol=1e-6)
    scalars = {(r.step, r.layer, r.topic, r.metric): float(r.value) for r in on_cpu.records
               if np.ndim(r.value) == 0 and r.metric not in ("alert",)}
    gpu = {(r.step, r.layer, r.topic, r.metric): float(r.value) for r in on_cuda.records
           if np.ndim(r.value) == 0 and r.metric not in ("alert",)}
    assert set(gpu) == set(scalars)
    for where, value in scalars.items():
        if where[3] == "zero_frac":
            assert gpu[where] == pytest.approx(value, abs=1e-3), where  # exact zeros may differ by rounding
        else:
            assert gpu[where] == pytest.approx(value, rel=1e-3, abs=1e-6), where
    # Independently of sonde: the first layer's weight statistics at each step, from numpy.
    for step, w in enumerate(cpu_weights):
        assert on_cuda.value(metric="std", layer="0", topic="weights", step=step) == pytest.approx(w.std(), rel=1e-4)
        assert on_cuda.value(metric="max", layer="0", topic="weights", step=step) == pytest.approx(w.max(), rel=1e-5)
    counts = {(r.step, r.layer, r.topic): r.value for r in on_cpu.find(metric="histogram")}
    for r in on_cuda.find(metric="histogram"):
        expected = counts[(r.step, r.layer, r.topic)]
        assert r.value.sum() == expected.sum()  # every finite value counted once
        assert np.abs(r.value - expected).sum() <= max(2, 1e-3 * expected.sum())  # bin edges: rounding only


def test_saturation_keeps_its_sums_on_the_gpu_and_its_syncs_off_the_training_thread(
        caplog: pytest.LogCaptureFixture) -> None:
    """Saturation accumulates its sums on the GPU as state and computes the eigenvalues there, on
    the worker; ``eigvalsh`` checks its result on the device, which may synchronise that thread,
    so the mode is "warn" and each synchronising call is attributed to its thread: none may be the
    training thread's. The values match numpy's on the same activations."""
    model = mlp().to("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(64, 32, generator=generator).cuda(), torch.randint(0, 10, (64,), generator=generator)
                .cuda()) for _ in range(STEPS)]
    outputs: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
    threads: list[str] = []
    collect = Collect()

    def show(message: Any, *_args: Any, **_kwargs: Any) -> None:
        if "synchronizing CUDA operation" in str(message):
            threads.append(threading.current_thread().name)

    with caplog.at_level(logging.WARNING, logger="sonde"), warnings.catch_warnings():
        warnings.filterwarnings("always", message=".*synchronizing CUDA operation")
        warnings.showwarning = show
        with sonde.probe(model, store=None, optimizer=opt, every=1, sinks=[collect],
                         metrics=[Saturation(compute_every=1, precision="float64", top_k=4)]) as p:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for x, y in batches:
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            p.flush()
    assert [name for name in threads if not name.startswith("sonde-")] == [], threads
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    for step, out in enumerate(outputs):
        cov = np.cov(out.double().cpu().numpy(), rowvar=False, bias=True)
        assert collect.value(metric="cov_trace", layer="0", step=step) == pytest.approx(np.trace(cov), rel=1e-9)
        np.testing.assert_allclose(collect.value(metric="eigenvalues", layer="0", step=step),
                                   np.linalg.eigvalsh(cov)[::-1][:4], rtol=1e-7, atol=1e-12)
