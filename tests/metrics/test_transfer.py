"""The packed transfer of a step's partials and the deferred flush, on the CPU with a fake event.

On CUDA a recorded step packs its partials into one device buffer, starts one asynchronous copy
into pinned memory, records an event and returns; the background worker waits on the event and
emits the Records. Everything but the CUDA calls is exercised here: a fake copier packs CPU
tensors as if they lived on a device, and its event blocks until the test releases it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

import sonde
from collect import Collect
from sonde.bus import Bus
from sonde.metrics import Alerts, Histogram, Loss, Mean, Norm, Saturation, SpectralNorm, Std, TensorStats, ZeroFrac
from sonde.metrics.engine import to_host
from sonde.metrics.transfer import Transfer
from sonde.records import Record
from sonde.worker import Worker


class FakeEvent:
    """Stands for ``torch.cuda.Event``: ``synchronize`` blocks until the test opens the gate."""

    def __init__(self, gate: threading.Event, fail: bool = False) -> None:
        self.gate, self.fail = gate, fail
        self.waits = 0
        self.threads: list[str] = []  # where synchronize was called

    def synchronize(self) -> None:
        self.waits += 1
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(10), "the test never released the copy"
        if self.fail:
            raise RuntimeError("the copy failed")


class FakeCopier:
    """Packs CPU tensors as if they lived on a device; each copy returns a fresh host tensor."""

    def __init__(self, *, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail
        self.copies: list[torch.Tensor] = []
        self.events: list[FakeEvent] = []

    def __call__(self, device: torch.device) -> Any:
        def copy(flat: torch.Tensor) -> tuple[torch.Tensor, FakeEvent]:
            self.copies.append(flat)
            event = FakeEvent(self.gate, self.fail)
            self.events.append(event)
            return flat.clone(), event

        return copy


# -- packing ------------------------------------------------------------------------------------
def test_partials_are_packed_into_one_float64_buffer_and_unpacked_to_their_values() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(3, 4)).astype(np.float32)
    half = rng.normal(size=5).astype(np.float32)
    big_count = 2**40 + 3  # exact in float64, not in float32
    tensor = torch.from_numpy(matrix)
    scalar = torch.tensor(2.5, dtype=torch.float64)
    halves = torch.from_numpy(half).to(torch.bfloat16)
    count = torch.tensor(big_count, dtype=torch.int64)
    parts = (7.0, scalar, count)
    on_host = np.array([1.0, 2.0])
    copier = FakeCopier()
    transfer = Transfer([tensor, parts, halves, on_host, tensor], copier)
    assert transfer.asynchronous and transfer.devices == [torch.device("cpu")]
    transfer.start()
    host = transfer.wait()

    assert len(copier.copies) == 1  # one buffer, one copy, one event for the whole step
    flat = copier.copies[0]
    assert flat.dtype == torch.float64 and flat.numel() == 12 + 1 + 1 + 5
    assert [e.waits for e in copier.events] == [1]
    np.testing.assert_array_equal(host[id(tensor)], matrix.astype(np.float64))
    assert host[id(tensor)].shape == (3, 4)
    assert host[id(parts)].tolist() == [7.0, 2.5, float(big_count)]
    assert int(host[id(parts)][2]) == big_count
    expected_halves = np.array([float(v) for v in torch.from_numpy(half).to(torch.bfloat16).float()])
    np.testing.assert_array_equal(host[id(halves)], expected_halves)
    assert host[id(on_host)] is on_host


def test_without_a_copier_cpu_tensors_are_read_in_place_and_to_host_agrees() -> None:
    values = [torch.tensor([1.0, 2.0]), (3.0, torch.tensor(4.0))]
    transfer = Transfer(values)
    assert transfer.devices == []
    transfer.start()
    host = transfer.wait()
    assert host[id(values[0])].tolist() == [1.0, 2.0] and host[id(values[1])].tolist() == [3.0, 4.0]
    again = to_host(values)
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in host.items()}


# -- the deferred flush -------------------------------------------------------------------------
def deferred_bus(metrics: list[Any], copier: FakeCopier, out: list[Record]) -> Bus:
    bus = Bus("run", metrics, topics=["activations", "loss"], schedule=lambda step: True)
    bus.worker = Worker(out.extend)
    bus.engine.copier = copier
    return bus


def test_a_deferred_flush_returns_at_once_and_the_worker_emits_the_steps_in_order() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(2, 8)) * (step + 1) for step in range(4)]
    losses = [[0.5 + step, 1.5 + step] for step in range(4)]  # two logs per step: averaged
    copier, out = FakeCopier(), list[Record]()
    bus = deferred_bus([TensorStats(stats=["mean", "std", "max"]), Loss()], copier, out)
    copier.gate.clear()  # the copies do not finish until released
    for step, batch in enumerate(batches):
        bus.publish("fc", "activations", torch.from_numpy(batch).float(), phase="train", step=step)
        for loss in losses[step]:
            bus.publish("net", "loss", torch.tensor(loss), phase="train", step=step)
        assert bus.flush("train", step) == []  # nothing read back on the caller's thread
    assert out == [] and bus.accumulating()
    copier.gate.set()
    assert bus.worker is not None and bus.worker.drain(10)
    assert len(copier.copies) == 4 and all(e.waits == 1 for e in copier.events)
    assert [r.step for r in out] == sorted(r.step for r in out)  # emitted in step order
    for step, batch in enumerate(batches):
        got = {r.metric: r.value for r in out if r.step == step}
        x = batch.astype(np.float32).astype(np.float64)
        assert got["mean"] == pytest.approx(x.mean(), rel=1e-6)
        assert got["std"] == pytest.approx(x.std(), rel=1e-6)
        assert got["max"] == pytest.approx(x.max(), rel=1e-7)
        assert got["loss"] == pytest.approx(np.mean(losses[step]))
    assert not bus.accumulating()
    bus.worker.close()


def test_state_kept_across_steps_and_updates_made_before_the_worker_caught_up() -> None:
    """compute_every=2 accumulates over recorded steps whose host parts run late (steps 0, 2, and
    the final one compute); a histogram fixes its edges at the first step and counts every later
    step over them."""
    rng = np.random.default_rng(2)
    batches = [rng.uniform(-1, 1, size=50) * (1 + 0.1 * step) for step in range(4)]
    copier, out = FakeCopier(), list[Record]()
    bus = deferred_bus([Mean(compute_every=2), Histogram(bins=4)], copier, out)
    copier.gate.clear()
    for step, batch in enumerate(batches):
        bus.publish("fc", "activations", torch.from_numpy(batch), phase="train", step=step)
        bus.flush("train", step)
    copier.gate.set()
    assert bus.worker is not None and bus.worker.drain(10)
    assert bus.accumulating()  # step 3's batch waits for the next computing step
    bus.flush("train", 3, final=True)
    assert bus.worker.drain(10)
    means = {r.step: r.value for r in out if r.metric == "mean"}
    assert means == pytest.approx({0: batches[0].mean(), 2: np.concatenate(batches[1:3]).mean(),
                                   3: batches[3].mean()})
    edges = np.linspace(batches[0].min(), batches[0].max(), 5)
    recorded = [r.value for r in out if r.metric == "histogram_edges"]
    assert len(recorded) == 1 and np.allclose(recorded[0], edges)
    for step, batch in enumerate(batches):
        counts = next(r.value for r in out if r.metric == "histogram" and r.step == step)
        expected, _ = np.histogram(np.clip(batch, edges[0], edges[-1]), bins=edges)
        assert np.asarray(counts).tolist() == expected.tolist()
    bus.worker.close()


def test_a_failure_reading_back_is_reported_once_and_switches_the_metrics_off(
        caplog: pytest.LogCaptureFixture) -> None:
    copier, out = FakeCopier(fail=True), list[Record]()
    bus = deferred_bus([Mean(), Loss()], copier, out)
    with caplog.at_level(logging.ERROR, logger="sonde"):
        for step in range(3):
            bus.publish("fc", "activations", torch.ones(4), phase="train", step=step)
            bus.publish("net", "loss", torch.tensor(0.5), phase="train", step=step)
            bus.flush("train", step)
            assert bus.worker is not None and bus.worker.drain(10)
    failures = [r for r in caplog.records if "reading a recorded step back" in r.getMessage()]
    assert len(failures) == 1 and out == []
    assert bus.engine.off and len(copier.copies) == 1  # nothing more is staged or copied
    assert bus.flush("train", 3) == [] and not bus.pending("train")
    assert bus.worker is not None and bus.worker.close()


def test_runs_with_a_metric_outside_the_deferrable_set_stay_synchronous() -> None:
    class Custom(Mean):
        """A user metric: its update may touch state the engine does not know about."""

    copier, out = FakeCopier(), list[Record]()
    bus = deferred_bus([Custom()], copier, out)
    bus.publish("fc", "activations", torch.tensor([1.0, 3.0]), phase="train", step=0)
    assert [(r.metric, r.value) for r in bus.flush("train", 0)] == [("mean", 2.0)]
    assert bus.worker is not None and bus.worker.close()


def test_a_probe_on_the_deferred_path_flushes_and_closes_with_every_value() -> None:
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    collect, copier = Collect(), FakeCopier()
    losses, weights = [], []
    metrics = [Mean(), Norm(), Std(), Loss(), "spectral_norm"]  # spectral_norm: the probe starts its worker
    with sonde.probe(model, store=None, optimizer=opt, every=1, metrics=metrics, sinks=[collect]) as p:
        p.bus.engine.copier = copier
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            weights.append(first.weight.detach().numpy().astype(np.float64).copy())
            opt.step()
            p.log(loss=loss)
            losses.append(float(loss.detach()))
        p.flush()
        flushed = {r.step for r in collect.find(metric="loss")}
    assert flushed == {0, 1}  # finished steps, waited for; step 2 is recorded at close
    assert len(copier.copies) == 3
    waited_on = {name for event in copier.events for name in event.threads}
    assert waited_on and all(name.startswith("sonde-worker") for name in waited_on)  # never the training thread
    assert [collect.value(metric="loss", step=s) for s in range(3)] == pytest.approx(losses)
    for step, w in enumerate(weights):
        assert collect.value(metric="mean", topic="weights", layer="0", step=step) == pytest.approx(w.mean())
        assert collect.value(metric="norm", topic="weights", layer="0", step=step) == pytest.approx(
            np.linalg.norm(w), rel=1e-6)
        assert collect.value(metric="spectral_norm", layer="0", step=step) == pytest.approx(
            np.linalg.svd(w, compute_uv=False)[0], rel=1e-4)


@pytest.mark.parametrize("reset", ["compute", "never"])
def test_offloaded_metrics_keeping_tensors_finish_their_steps_on_the_worker(
        reset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA GPU runs, here on the CPU: the steps finish on the worker (the fake copier), the
    spectral norm's weight copies and saturation's sums stay tensors in the metrics' state, and
    every value agrees with numpy's, whether saturation starts afresh at each value or not."""
    monkeypatch.setattr(Saturation, "device_types", ("cuda", "cpu"))
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 6)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs: list[np.ndarray] = []
    first.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().double().numpy().copy()))
    collect, copier = Collect(), FakeCopier()
    weights = []
    metrics = [Mean(), Loss(), SpectralNorm(where="device"),
               Saturation(compute_every=2, reset=reset, precision="float64", top_k=3)]
    with sonde.probe(model, store=None, optimizer=opt, every=1, metrics=metrics, sinks=[collect]) as p:
        p.bus.engine.copier = copier
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(model(torch.randn(16, 4)), torch.randn(16, 2))
            opt.zero_grad()
            loss.backward()
            weights.append(first.weight.detach().double().numpy().copy())
            opt.step()
            p.log(loss=loss)
    waited_on = {name for event in copier.events for name in event.threads}
    assert len(copier.copies) == 5 and all(name.startswith("sonde-worker") for name in waited_on)
    for step, w in enumerate(weights):
        assert collect.value(metric="spectral_norm", layer="0", step=step) == pytest.approx(
            np.linalg.svd(w, compute_uv=False)[0], rel=1e-5)
    assert sorted({r.step for r in collect.find(metric="cov_trace", layer="0")}) == [0, 2, 4]
    for step, covered in ((0, [0]), (2, [1, 2]), (4, [3, 4])):
        rows = np.concatenate([outputs[s] for s in (range(step + 1) if reset == "never" else covered)])
        cov = np.cov(rows, rowvar=False, bias=True)
        assert collect.value(metric="cov_trace", layer="0", step=step) == pytest.approx(np.trace(cov), rel=1e-9)
        np.testing.assert_allclose(collect.value(metric="eigenvalues", layer="0", step=step),
                                   np.linalg.eigvalsh(cov)[::-1][:3], rtol=1e-9)


def test_alerts_read_the_records_of_deferred_steps() -> None:
    dead = torch.nn.Linear(4, 3)
    with torch.no_grad():
        dead.weight.zero_()
        dead.bias.fill_(-1.0)  # every ReLU output is exactly zero: dead units
    model = torch.nn.Sequential(dead, torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    collect, copier = Collect(), FakeCopier()
    metrics = [ZeroFrac(), Loss(), Alerts(warmup=0), "spectral_norm"]
    with sonde.probe(model, store=None, optimizer=opt, every=1, metrics=metrics, sinks=[collect]) as p:
        p.bus.engine.copier = copier
        for _ in range(2):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            p.log(loss=loss)
    assert len(copier.copies) == 2
    relu_out = np.maximum(np.full((8, 3), -1.0), 0.0)  # zero weights, bias -1: what the ReLU saw
    assert collect.value(metric="zero_frac", layer="1", topic="activations", step=0) == np.mean(relu_out == 0)
    alerts = collect.find(metric="alert", layer="1")
    assert [a.step for a in alerts] == [0] and "dead units" in alerts[0].message


def test_a_step_the_full_worker_skips_is_lost_loudly_and_leaves_nothing_pending(
        caplog: pytest.LogCaptureFixture) -> None:
    copier, out = FakeCopier(), list[Record]()
    bus = Bus("run", [Loss()], topics=["loss"], schedule=lambda step: True)
    worker = bus.worker = Worker(out.extend, max_pending=1)
    bus.engine.copier = copier
    copier.gate.clear()
    with caplog.at_level(logging.ERROR, logger="sonde"):
        for step in range(3):  # step 0 runs (waiting on its copy), step 1 waits, step 2 finds the queue full
            bus.publish("net", "loss", torch.tensor(float(step)), phase="train", step=step)
            bus.flush("train", step)
            if step == 0:
                deadline = time.monotonic() + 10
                while not copier.events[0].waits and time.monotonic() < deadline:
                    time.sleep(0.01)
    assert worker.skipped == 1 and any("queue is full" in r.getMessage() for r in caplog.records)
    copier.gate.set()
    assert worker.drain(10)
    assert [(r.step, r.value) for r in out] == [(0, 0.0), (1, 1.0)]
    assert not bus.accumulating()
    assert worker.close()
