"""Accumulating metrics (``compute_every``, ``reset``) and the background worker (``offload``).

Every expected value is computed in the test from the batches the test itself fed: a metric
that sums the rows it saw and counts them, so which batches a value covers is visible exactly.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.metrics import Metric
from sonde.metrics.base import Capture
from sonde.records import Record
from sonde.worker import ComputeTask, Worker


class RowSum(Metric):
    """Sum of all input elements and number of rows, accumulated."""

    name = "row_sum"
    outputs = ("total", "rows")
    topics = ("inputs",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=0.0, reduce="sum")
        self.add_state("rows", default=0.0, reduce="sum")

    def update(self, capture: Capture) -> None:
        t = capture.tensor.detach().double()
        self.stage("total", t.sum())
        self.stage("rows", torch.tensor(float(t.shape[0])))

    def compute(self) -> dict[str, Any]:
        return {"total": float(self.state["total"]), "rows": float(self.state["rows"])}


class OffloadedRowSum(RowSum):
    offload: ClassVar[bool] = True
    threads: ClassVar[list[str]] = []

    def compute(self) -> dict[str, Any]:
        OffloadedRowSum.threads.append(threading.current_thread().name)
        return super().compute()


def train(metric: Metric, steps: int, *, epochs_at: tuple[int, ...] = (), collect: Collect) -> list[np.ndarray]:
    """Train a one-layer model for ``steps`` steps; return the input batch of every step."""
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    batches = []
    with sonde.probe(model, store=None, optimizer=opt, metrics=[metric], sinks=[collect], layers=["0"], every=1) as p:
        for step in range(steps):
            x = torch.randn(2 + step % 3, 3, generator=gen)
            batches.append(x.numpy().astype(np.float64))
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            if step in epochs_at:
                p.end_epoch()
    return batches


def series(collect: Collect, metric: str = "total", phase: str = "train") -> dict[int, float]:
    found = collect.find(metric=metric, phase=phase)
    out = {r.step: float(r.value) for r in found}
    assert len(out) == len(found), "one value per step"
    return out


def covered(batches: list[np.ndarray], steps: range | list[int]) -> float:
    return float(sum(batches[s].sum() for s in steps))


def test_default_computes_every_updated_step(collect: Collect) -> None:
    batches = train(RowSum(), 5, collect=collect)
    assert series(collect) == pytest.approx({s: covered(batches, [s]) for s in range(5)})


def test_reset_compute_covers_exactly_the_batches_since_the_previous_value(collect: Collect) -> None:
    batches = train(RowSum(compute_every=3), 8, collect=collect)
    got = series(collect)
    # Values at 0, 3, 6 (the schedule) and 7 (the last step: nothing recorded is lost).
    assert sorted(got) == [0, 3, 6, 7]
    assert got[0] == pytest.approx(covered(batches, [0]))
    assert got[3] == pytest.approx(covered(batches, [1, 2, 3]))
    assert got[6] == pytest.approx(covered(batches, [4, 5, 6]))
    assert got[7] == pytest.approx(covered(batches, [7]))
    assert series(collect, "rows") == {0: 2.0, 3: 3 + 4 + 2, 6: 3 + 4 + 2, 7: 3.0}


def test_reset_never_accumulates_the_whole_run(collect: Collect) -> None:
    batches = train(RowSum(compute_every=sonde.every(4), reset="never"), 9, collect=collect)
    got = series(collect)
    assert sorted(got) == [0, 4, 8]
    for step in got:
        assert got[step] == pytest.approx(covered(batches, range(step + 1)))


def test_reset_epoch_starts_afresh_after_end_epoch(collect: Collect) -> None:
    # Epochs end at steps 4 and 9 (after their optimizer step); values every 3 steps.
    batches = train(RowSum(compute_every=3, reset="epoch"), 12, epochs_at=(4, 9), collect=collect)
    got = series(collect)
    assert sorted(got) == [0, 3, 4, 6, 9, 11]
    assert got[3] == pytest.approx(covered(batches, range(0, 4)))
    assert got[4] == pytest.approx(covered(batches, range(0, 5)))  # the epoch's last step computes
    assert got[6] == pytest.approx(covered(batches, range(5, 7)))  # fresh epoch
    assert got[9] == pytest.approx(covered(batches, range(5, 10)))
    assert got[11] == pytest.approx(covered(batches, range(10, 12)))


def test_compute_every_steps_that_were_not_updated_still_compute(collect: Collect) -> None:
    # Updated every 2nd step, computed every 5th: step 5 is not updated but computes 2 and 4.
    batches = train(RowSum(every=2, compute_every=5), 11, collect=collect)
    got = series(collect)
    assert sorted(got) == [0, 5, 10]
    assert got[5] == pytest.approx(covered(batches, [2, 4]))
    assert got[10] == pytest.approx(covered(batches, [6, 8, 10]))


def test_bad_reset_is_refused() -> None:
    with pytest.raises(ConfigError, match="reset= expects one of 'compute', 'epoch', 'never', got 'step'"):
        RowSum(reset="step")


def test_offloaded_compute_runs_on_the_worker_and_keeps_its_step(collect: Collect) -> None:
    OffloadedRowSum.threads.clear()
    batches = train(OffloadedRowSum(compute_every=2), 7, collect=collect)
    got = series(collect)
    assert sorted(got) == [0, 2, 4, 6]
    assert got[2] == pytest.approx(covered(batches, [1, 2]))
    assert got[6] == pytest.approx(covered(batches, [5, 6]))
    assert OffloadedRowSum.threads and all(name.startswith("sonde-worker") for name in OffloadedRowSum.threads)


def test_eval_passes_compute_at_each_pass_apart_from_train(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x_eval = torch.randn(5, 3)
    with sonde.probe(model, store=None, optimizer=opt, metrics=[OffloadedRowSum(compute_every=10)],
                     sinks=[collect], layers=["0"]):
        for _ in range(4):
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model(x_eval)
                model(x_eval)
    evals = series(collect, phase="eval")
    assert evals == pytest.approx({s: 2 * float(x_eval.double().sum()) for s in (1, 2, 3, 4)})
    assert series(collect) == {0: 6.0, 3: 18.0}  # train: step 0 and the last step (1..3)


class Slow(ComputeTask):
    def __init__(self, gate: threading.Event, value: str, log: list[str]) -> None:
        super().__init__(self.go, "slow")
        self.gate, self.value, self.log = gate, value, log

    def go(self) -> list[Any]:
        self.gate.wait(10)
        return [self.value]

    def coalesce(self, older: ComputeTask) -> None:
        self.log.append(f"{self.value} absorbs {older.value}")  # type: ignore[attr-defined]


def test_worker_falling_behind_coalesces_loudly_and_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    out: list[Any] = []
    gate = threading.Event()
    merges: list[str] = []
    worker = Worker(out.extend, max_backlog=1)
    worker.submit("a", Slow(gate, "a0", merges))  # the worker starts it and waits on the gate
    while worker.pending and not worker._busy:
        pass
    with caplog.at_level(logging.ERROR, logger="sonde"):
        for i in range(1, 4):
            worker.submit("a", Slow(gate, f"a{i}", merges))  # returns at once although the worker is stuck
        worker.submit("b", Slow(gate, "b1", merges))
    assert merges == ["a2 absorbs a1", "a3 absorbs a2"]
    assert sum("falling behind" in r.message for r in caplog.records) == 1
    gate.set()
    assert worker.close(5)
    assert out == ["a0", "a3", "b1"]
    assert worker.coalesced == 2


def test_worker_queue_bound_skips_loudly(caplog: pytest.LogCaptureFixture) -> None:
    out: list[Any] = []
    gate = threading.Event()
    worker = Worker(out.extend, max_pending=2)
    worker.submit(0, Slow(gate, "busy", []))
    while not worker._busy:
        pass
    with caplog.at_level(logging.ERROR, logger="sonde"):
        for key in range(1, 5):
            worker.submit(key, Slow(gate, f"k{key}", []))
    assert worker.skipped == 2
    assert any("queue is full" in r.message for r in caplog.records)
    gate.set()
    worker.close(5)
    assert out == ["busy", "k1", "k2"]


def test_worker_errors_are_logged_once_per_metric_then_counted_at_close(caplog: pytest.LogCaptureFixture) -> None:
    out: list[Any] = []
    worker = Worker(out.extend)
    errors = iter(["bad state", "bad state", "a later, different fault"])

    def boom() -> list[Any]:
        raise ValueError(next(errors))

    with caplog.at_level(logging.ERROR, logger="sonde"):
        for i in range(3):
            worker.submit(i, ComputeTask(boom, "broken"))
        worker.submit("ok", ComputeTask(lambda: ["fine"], "good"))
        assert worker.drain(5)
        during = [r.message for r in caplog.records if "broken" in r.message]
        assert worker.close(5)
    assert len(during) == 1 and "ValueError: bad state" in during[0]
    (summary,) = [r.message for r in caplog.records if "broken" in r.message][1:]
    assert "failed 3 times" in summary and "ValueError: a later, different fault" in summary
    assert out == ["fine"]


def test_close_waits_for_outstanding_work_and_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    out: list[Any] = []
    gate = threading.Event()
    worker = Worker(out.extend)
    worker.submit("stuck", Slow(gate, "late", []))
    with caplog.at_level(logging.ERROR, logger="sonde"):
        assert worker.close(0.2) is False
    assert any("did not finish within" in r.message for r in caplog.records)
    gate.set()


class ExplodingOffload(RowSum):
    offload: ClassVar[bool] = True

    def compute(self) -> dict[str, Any]:
        raise RuntimeError("eigh did not converge")


def test_offloaded_failure_never_reaches_training(collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sonde"):
        train(ExplodingOffload(), 4, collect=collect)
    assert [r for r in collect.records if isinstance(r, Record)] == []
    reported = [r.message for r in caplog.records if "eigh did not converge" in r.message]
    assert len(reported) == 2 and "failed 4 times" in reported[1]  # once as it happens, counted at close


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread priority is a Linux feature")
def test_worker_runs_at_background_priority() -> None:
    """Heavy computes yield the cores to training: the worker thread runs at nice 19."""
    seen: list[int] = []
    worker = Worker(lambda records: None)
    def task() -> list[Any]:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return []

    worker.submit(("k",), ComputeTask(task))
    assert worker.close()
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the training thread keeps its own


class FailsOnSomeSteps(RowSum):
    """Fails at update on the steps in ``failing``, each time with a different message."""

    failing: ClassVar[set[int]] = {1, 2, 4}

    def update(self, capture: Capture) -> None:
        if capture.step in self.failing:
            raise RuntimeError(f"fault at step {capture.step}")
        super().update(capture)


def test_a_metric_that_keeps_failing_is_reported_again_with_a_count_at_close(
        collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sonde"):
        batches = train(FailsOnSomeSteps(), 6, collect=collect)
    reported = [r.message for r in caplog.records if "'row_sum' failed" in r.message]
    assert len(reported) == 2, reported
    assert "fault at step 1" in reported[0]
    assert "failed 3 times" in reported[1] and "fault at step 4" in reported[1]  # the last fault, not the first
    assert series(collect) == pytest.approx({s: covered(batches, [s]) for s in (0, 3, 5)})  # the others go on
