"""The overhead budget (sonde.budget): intervals chosen from measured cost, with a fake clock.

No timing is asserted: every duration here is what the test's fake clock says.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.budget import Budget, TroubleWatch
from sonde.errors import ConfigError
from sonde.records import Record
from sonde.topics import SCHEDULE_TOPIC


class Clock:
    """A clock the test moves: ``clock.now += seconds``; ``clock.cpu`` is the CPU time sonde's
    background threads spent (:func:`background`)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cpu = 0.0

    def __call__(self) -> float:
        return self.now

    def background(self) -> float:
        return self.cpu


def simulate(budget: Budget, clock: Clock, steps: int, *, base: float, cost: float,
             worker: dict[str, float] | None = None, answers: dict[int, bool] | None = None,
             records: list[Record] | None = None, writing: float = 0.0, start: int = 0,
             after: float = 0.0) -> list[int]:
    """Steps as the probe runs them: ``base`` seconds each, ``cost`` more when recorded, ``after``
    more for the unrecorded step right after a recorded one, ``worker`` seconds per recording of
    each offloaded metric, ``writing`` CPU seconds of the sinks' threads per recorded step (spent
    off the training thread: the step takes no longer); the decision at
    recorded steps, then the answer for the next step at the end of each step (kept in
    ``answers``), from step ``start`` on. Returns the recorded steps."""
    recorded = []
    for k in range(start, start + steps):
        if answers is not None and k in answers:
            assert budget.records("stats", k) == answers[k], f"the answer for step {k} changed"
        clock.now += base
        if budget.recorded(k):
            recorded.append(k)
            clock.now += cost
            clock.cpu += writing
        elif recorded and recorded[-1] == k - 1:
            clock.now += after
        for name, seconds in (worker or {}).items():
            if budget.records(name, k):
                budget.add_metric_time(name, seconds, training_thread=False)
        if budget.due(k) and budget.recorded(k):
            budget.adopt(budget.proposal(), k)
        if records is not None:
            records += budget.settled_records("run", k)
        budget.step_ended(k)
        if answers is not None:
            answers[k + 1] = budget.records("stats", k + 1)  # asked at the end of step k
    return recorded


def gaps(steps: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(steps)]


def test_interval_follows_measured_cost() -> None:
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    answers: dict[int, bool] = {}
    recorded = simulate(budget, clock, 400, base=0.010, cost=0.0019, answers=answers)  # 19% a recorded step
    # step 0 and the warm-up in full; the first decision (step 4) applies from step 6: every other
    # step until three unrecorded steps are measured
    assert recorded[:10] == [0, 1, 2, 3, 4, 5, 6, 8, 10, 12]
    # 19% per recorded step under a 5% budget: one step in 4 (0.19 / 4 = 4.75%)
    assert budget.schedule() == {"stats": 4}
    assert budget.settled
    assert all(k % 4 == 0 for k in recorded if k > 100)
    assert budget.estimate == pytest.approx(0.0475)


def test_the_interval_is_the_densest_on_the_ladder_that_fits() -> None:
    """45% per recorded step fits at one step in 10 (4.5%), not in 8 (5.6%): a doubling ladder would
    have gone to 16, leaving a third of the budget unused."""
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    recorded = simulate(budget, clock, 400, base=0.010, cost=0.0045)
    assert budget.schedule() == {"stats": 10}
    assert [k for k in recorded if k >= 300] == list(range(300, 400, 10))
    assert budget.estimate == pytest.approx(0.045)


def test_the_sinks_background_time_counts_against_the_budget() -> None:
    """19% of a step on the training thread and 26% more on the sinks' threads per recorded step:
    45% in all, one step in 10 (4.5%), where the training thread's share alone fits one in 4."""
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    simulate(budget, clock, 400, base=0.010, cost=0.0019, writing=0.0026)
    assert budget.schedule() == {"stats": 10}
    assert budget.estimate == pytest.approx(0.045)


def test_what_a_recording_costs_the_next_step_counts_against_the_budget() -> None:
    """19% of a step more when recorded and 9% more at the unrecorded step after it (the caches
    the recording filled are refilled there): 28% per recording, one step in 6 (4.7%), where the
    recorded steps' own cost fits one in 4. Over the run, monitoring stays within 5%."""
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    recorded = simulate(budget, clock, 600, base=0.010, cost=0.0019, after=0.0009)
    assert budget.schedule() == {"stats": 6}
    assert budget.estimate == pytest.approx(0.28 / 6)
    followed = [k for k in recorded if k + 1 < 600 and k + 1 not in recorded]
    assert len(recorded) * 0.0019 + len(followed) * 0.0009 <= 0.05 * 0.010 * 600


def test_a_cheap_recording_that_slows_the_next_step_is_measured_apart_from_it() -> None:
    """8% of a step more when recorded and 4% more at the step after it. Recording every other
    step, each unrecorded step follows a recording, so the two cannot be told apart there (the
    recording would seem to cost 4%, and every step would be recorded at 8%): the budget leaves two
    steps out until it has measured the next step's share, then records every third step (4%)."""
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    recorded = simulate(budget, clock, 400, base=0.010, cost=0.0008, after=0.0004)
    assert budget.schedule() == {"stats": 3}
    followed = [k for k in recorded if k + 1 < 400 and k + 1 not in recorded]
    assert len(recorded) * 0.0008 + len(followed) * 0.0004 <= 0.05 * 0.010 * 400


def test_the_warm_up_and_trouble_windows_are_paid_back() -> None:
    """The warm-up (recorded in full before the cost is known) and a trouble window cost more than
    5%: sparser plans pay that back, then the budget's own plan returns. Over the whole run,
    monitoring took at most 5% (the fake clock's cost of the recorded steps, step 0 included)."""
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    records: list[Record] = []
    recorded = simulate(budget, clock, 300, base=0.010, cost=0.0019, records=records)
    after_warm_up = gaps([k for k in recorded if 12 <= k < 100])
    assert 4 < max(after_warm_up) <= 8  # paying: sparser, at most twice the interval the budget alone allows
    assert gaps([k for k in recorded if k >= 150]) == [4] * (len([k for k in recorded if k >= 150]) - 1)
    assert len(recorded) * 0.0019 <= 0.05 * 0.010 * 300
    assert budget.debt == 0.0 and not budget.paying
    window = budget.force(301)
    recorded += simulate(budget, clock, 300, base=0.010, cost=0.0019, records=records, start=300)
    later = [k for k in recorded if k >= 300]
    assert set(range(*window)) <= set(later)
    assert max(gaps([k for k in later if k >= window[1]])) > 4  # the window paid back
    assert gaps([k for k in later if k >= 450]) == [4] * (len([k for k in later if k >= 450]) - 1)
    assert len(recorded) * 0.0019 <= 0.05 * 0.010 * 600
    # the passing plans are neither logged nor recorded as the schedule: only the settled one
    assert [(r.metric, r.value) for r in records] == [("stats", 4.0)]


def test_the_noise_of_unrecorded_steps_is_not_a_debt() -> None:
    """Unrecorded steps that are sometimes slow (a mean well above the median) are not charged to
    monitoring: once the warm-up is paid back, the budget's own plan holds."""
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    slow = itertools.cycle([0.0] * 4 + [0.005])  # one unrecorded step in five takes 50% longer
    for k in range(400):
        clock.now += 0.010
        if budget.recorded(k):
            clock.now += 0.0019
        else:
            clock.now += next(slow)
        if budget.due(k) and budget.recorded(k):
            budget.adopt(budget.proposal(), k)
        budget.step_ended(k)
    assert budget.schedule() == {"stats": 4}
    assert budget.debt == 0.0 and not budget.paying


def test_cheap_monitoring_records_every_step() -> None:
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    recorded = simulate(budget, clock, 200, base=0.010, cost=0.0001)  # 1%
    assert budget.schedule() == {"stats": 1}
    assert recorded[-100:] == list(range(100, 200))


@pytest.mark.parametrize("max_interval", [100, 10, 1])
def test_max_interval_is_never_exceeded(max_interval: int) -> None:
    clock = Clock()
    budget = Budget(0.05, max_interval, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    recorded = simulate(budget, clock, 600, base=0.010, cost=1.0)  # 100 steps' worth per recording
    assert max(gaps(recorded)) <= max_interval
    assert budget.schedule()["stats"] == {100: 96, 10: 10, 1: 1}[max_interval]


def test_offloaded_metrics_are_spaced_further() -> None:
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    for name in ("stats", "histogram"):
        budget.register(name, expensive=False)
    budget.register("saturation", expensive=True)
    budget.register("loss", expensive=False, free=True)
    simulate(budget, clock, 800, base=0.010, cost=0.0002, worker={"saturation": 0.010})
    chosen = budget.schedule()
    assert chosen["loss"] == 1
    assert chosen["stats"] == chosen["histogram"] < chosen["saturation"] <= 96
    assert chosen["saturation"] % chosen["stats"] == 0
    # what the choice costs: 2% per recording of the statistics, 100% per saturation
    assert 0.0002 / chosen["stats"] + 0.010 / chosen["saturation"] <= 0.05 * 0.010


def test_intervals_settle_and_are_recorded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    records: list[Record] = []
    with caplog.at_level(logging.INFO, logger="sonde"):
        simulate(budget, clock, 400, base=0.010, cost=0.0019, records=records)
    assert [(r.topic, r.metric, r.value) for r in records] == [(SCHEDULE_TOPIC, "stats", 4.0)]
    assert records[0].message == "recorded every 4th step to stay under 5%"
    assert len([m for m in caplog.messages if "overhead budget" in m]) == 1


def test_trouble_forces_the_next_steps_after_the_answered_ones() -> None:
    clock = Clock()
    budget = Budget(0.05, 100, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    simulate(budget, clock, 300, base=0.010, cost=1.0)
    assert budget.schedule()["stats"] == 96
    budget.records("stats", 301)  # step 301 was answered already: it stays as it was
    first, end = budget.force(301)
    assert (first, end) == (302, 307)
    assert [k for k in range(300, 320) if budget.records("stats", k)] == [302, 303, 304, 305, 306]


def test_budget_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="budget="):
        Budget(0.0)
    with pytest.raises(ConfigError, match="max_interval="):
        Budget(0.05, 0)


# -- trouble ---------------------------------------------------------------------------------------


def test_trouble_watch_nan_spike_and_episodes() -> None:
    watch = TroubleWatch()
    rng = np.random.default_rng(0)
    found = [watch.observe(k, torch.tensor(2.0 + 0.05 * rng.standard_normal())) for k in range(30)]
    assert found == [None] * 30  # ordinary noise
    assert watch.observe(30, torch.tensor(float("nan"))) == (30, "NaN/Inf")
    assert watch.observe(31, torch.tensor(float("inf"))) is None  # the same episode
    assert watch.observe(32, torch.tensor(2.0)) is None
    at, what = watch.observe(33, torch.tensor(50.0))  # type: ignore[misc]
    assert at == 33 and what.startswith("spike")
    assert watch.observe(34, torch.tensor(1.5)) is None  # a drop is no trouble


class _SlowCopy(TroubleWatch):
    """The accelerator path on the CPU: the copy's event says done only when the test says so."""

    class Event:
        def __init__(self) -> None:
            self.done = False

        def query(self) -> bool:
            return self.done

    def __init__(self) -> None:
        super().__init__()
        self.events: list[_SlowCopy.Event] = []

    def _copy(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        event = self.Event()
        self.events.append(event)
        return tensor.double().reshape(()).clone(), event


def test_trouble_watch_reads_device_values_later_without_waiting() -> None:
    watch = _SlowCopy()
    assert watch.observe(0, torch.tensor(float("nan")), defer=True) is None  # copy not done: no wait
    assert watch.observe(1, torch.tensor(1.0), defer=True) is None
    watch.events[0].done = True
    assert watch.observe(2, torch.tensor(1.0), defer=True) == (0, "NaN/Inf")  # found one step later
    assert len(watch.pending) == 2  # steps 1 and 2 wait for their copies
    watch.events[1].done = watch.events[2].done = True
    assert watch.observe(3, torch.tensor(1.0), defer=True) is None
    assert [step for step, *_ in watch.pending] == [3]  # its own copy, checked at the next call


# -- through a probe -------------------------------------------------------------------------------


def _model() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 6), torch.randint(0, 3, (16,))


def _train(p: sonde.Probe, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           steps: int, clock: Clock, *, cost: float, losses: dict[int, float] | None = None,
           grads: dict[int, float] | None = None) -> dict[int, float]:
    """Train ``steps`` steps; the fake clock says each takes 10 ms, ``cost`` more when recorded.
    ``losses``: the loss logged at some steps instead of the real one; ``grads``: a factor on the
    loss that is differentiated at some steps (the loss logged stays the real one).
    Returns the first layer's mean weight before each step's optimizer step."""
    means = {}
    for k in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        (loss * (grads or {}).get(k, 1.0)).backward()
        means[k] = float(model[0].weight.detach().double().mean())
        opt.step()
        p._recorded(k + 1)  # what the adapter asks right after the optimizer step
        opt.zero_grad()
        p.log(loss=torch.tensor((losses or {}).get(k, float(loss.detach()))))
        clock.now += 0.010 + (cost if p._recorded(k) else 0.0)
    return means


def test_probe_budget_spaces_recordings(collect: Collect) -> None:
    model, opt, x, y = _model()
    clock = Clock()
    with sonde.probe(model, optimizer=opt, store=None, sinks=[collect], every=None) as p:
        assert p.budget is not None
        p.budget.clock = clock
        p.budget.background = clock.background
        means = _train(p, model, opt, x, y, 200, clock, cost=0.0019)
        chosen = p.schedule()
    assert chosen["stats"] == chosen["histogram"] == 4
    assert chosen["loss"] == 1
    weight_steps = sorted({r.step for r in collect.find(layer="0", topic="weights", metric="mean")})
    assert weight_steps[:6] == list(range(6))
    assert all(k % 4 == 0 for k in weight_steps if k >= 100)
    assert max(gaps([k for k in weight_steps if k >= 100])) == 4
    loss_steps = sorted(r.step for r in collect.find(topic="loss", metric="loss"))
    assert loss_steps == list(range(200))  # the loss is recorded every step
    for k in weight_steps[-3:]:  # the values at recorded steps are exact
        assert collect.value(layer="0", topic="weights", metric="mean", step=k) == pytest.approx(means[k])
    schedule = collect.find(topic=SCHEDULE_TOPIC)
    assert {r.metric: r.value for r in schedule}["stats"] == 4.0
    assert any(r.message == "recorded every 4th step to stay under 5%" for r in schedule)


def test_explicit_every_turns_the_budget_off(collect: Collect) -> None:
    model, opt, x, y = _model()
    with sonde.probe(model, optimizer=opt, store=None, sinks=[collect], every=1) as p:
        assert p.budget is None
        _train(p, model, opt, x, y, 20, Clock(), cost=1.0)
        assert p.schedule()["stats"] == 1
    assert sorted({r.step for r in collect.find(layer="0", topic="weights", metric="mean")}) == list(range(20))
    assert not collect.find(topic=SCHEDULE_TOPIC)


@pytest.mark.parametrize("trouble", ["nan", "spike"])
def test_trouble_records_the_next_steps_in_full(collect: Collect, trouble: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    model, opt, x, y = _model()
    clock = Clock()
    bad = {100: float("nan") if trouble == "nan" else 1e4, 101: float("nan") if trouble == "nan" else 1e4}
    with sonde.probe(model, optimizer=opt, store=None, sinks=[collect], every=None) as p:
        p.budget.clock = clock  # type: ignore[union-attr]
        p.budget.background = clock.background  # type: ignore[union-attr]
        _train(p, model, opt, x, y, 130, clock, cost=1.0, losses=bad)
        assert p.schedule()["stats"] == 96
    steps = sorted({r.step for r in collect.find(layer="0", topic="weights", metric="mean")})
    after = [k for k in steps if 100 < k < 128]
    assert after == [102, 103, 104, 105, 106]  # 101 was answered at the end of step 100
    alerts = collect.find(topic="loss", metric="alert")
    assert len(alerts) == 1 and alerts[0].step == 100
    assert "steps 102-106 are recorded in full" in alerts[0].message
    assert ("NaN/Inf" if trouble == "nan" else "spike") in alerts[0].message


def test_the_intervals_reach_the_store_and_the_run_page(tmp_path: Path) -> None:
    from sonde.server.ui.data import Choices
    from sonde.server.ui.source import Source
    from sonde.store import open_store

    model, opt, x, y = _model()
    clock = Clock()
    db = str(tmp_path / "sonde.db")
    with sonde.probe(model, optimizer=opt, store=db, run="budgeted", every=None) as p:
        p.budget.clock = clock  # type: ignore[union-attr]
        p.budget.background = clock.background  # type: ignore[union-attr]
        _train(p, model, opt, x, y, 120, clock, cost=0.0019)
    frame = sonde.load(db, run="budgeted")
    stored = frame[frame.topic == SCHEDULE_TOPIC]
    assert dict(zip(stored.metric, stored.value, strict=True)) == {
        "histogram": 4.0, "stats": 4.0, "update_ratio": 4.0}
    with open_store(db) as store:
        choices = Choices.from_available(store.available("budgeted"))
        assert choices.has_schedule
        assert SCHEDULE_TOPIC not in choices.layer_metrics and SCHEDULE_TOPIC not in choices.network_metrics
        rows = asyncio.run(Source(store).schedule("budgeted"))
    assert rows[0][1:] == (4, "recorded every 4th step to stay under 5%")


def test_a_budget_the_longest_interval_cannot_meet_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = Budget(0.05, 16, clock=clock, background=clock.background)
    budget.register("stats", expensive=False)
    with caplog.at_level(logging.INFO, logger="sonde"):
        simulate(budget, clock, 600, base=0.010, cost=0.030, records=[])  # 300% a recorded step: 19% at 1 in 16
    assert budget.schedule() == {"stats": 16}
    assert budget.estimate == pytest.approx(0.03 / 16 / 0.010)
    assert caplog.text.count("even at the longest interval") == 1


@pytest.mark.parametrize("trouble", ["nan", "spike"])
def test_gradient_norm_trouble_at_a_recorded_step_records_the_next_steps_in_full(
        collect: Collect, trouble: str) -> None:
    """The loss logged stays clean; the gradients of step 64 (a recorded step) are NaN or 30 times
    too large. The gradient norm those steps carry (from each layer's weight_grads/bias_grads norm)
    fires, and the next steps are recorded in full."""
    model, opt, x, y = _model()
    clock = Clock()
    with sonde.probe(model, optimizer=opt, store=None, sinks=[collect], every=None, max_interval=64) as p:
        p.budget.clock = clock  # type: ignore[union-attr]
        p.budget.background = clock.background  # type: ignore[union-attr]
        _train(p, model, opt, x, y, 80, clock, cost=1.0, grads={64: float("nan") if trouble == "nan" else 30.0})
        assert p.schedule()["stats"] == 64
    for k in range(6):  # what the check read: four gradient norms per recorded step, all finite before
        layers = [r.value for r in collect.find(metric="norm", step=k) if r.topic in ("weight_grads", "bias_grads")]
        assert len(layers) == 4 and np.isfinite(layers).all()
    alerts = [a for a in collect.find(metric="alert") if a.topic != "loss"]
    if trouble == "spike":
        assert [(a.step, a.topic) for a in alerts] == [(64, "weight_grads")]
        assert alerts[0].message.startswith("gradient norm spike (") and " at step 64: " in alerts[0].message
    else:  # NaN gradients: the alert naming the first non-finite layer says it, and no second alert
        assert [a.step for a in alerts] == [64] and "first appeared at step 64" in alerts[0].message
    steps = sorted({r.step for r in collect.find(layer="0", topic="weights", metric="mean")})
    # 65 was answered at the end of step 64. A NaN update makes the weights NaN, so the loss of step
    # 65 is NaN too, and its own alert extends the window by one step.
    assert [k for k in steps if k > 64] == [66, 67, 68, 69, 70] + ([71] if trouble == "nan" else [])
    assert [a.step for a in collect.find(topic="loss", metric="alert")] == ([65] if trouble == "nan" else [])
