"""The overhead budget: each metric recorded as often as a fraction of training time allows.

``sonde.probe(model, budget=0.05, max_interval=100)`` (the default when ``every=`` is not given)
records every step of the first ``warmup`` (4) steps, measuring what monitoring costs, then at
most every other step until three unrecorded steps were measured, then spaces each metric's
recordings so that the average cost over the run stays under ``budget`` × the unmonitored step:

* **what it measures**: on the training thread, the time between consecutive step boundaries,
  split into recorded and unrecorded steps (the difference is what a recorded step costs, hooks,
  allocations and caches included, plus what the step after it takes beyond the others: it
  refills the caches the recording displaced), and the time spent inside sonde's own calls
  (publish and flush: the only figure before the first unrecorded step, and at unrecorded steps
  what every step costs, which is counted but cannot be spaced); off the training thread, the
  background worker's time per offloaded metric, and the CPU time of the threads that write the
  Records (:mod:`sonde.background`) per recorded step, both counted in full (they compete for
  the cores training uses, and for the GIL);
* **what it chooses**: one interval for the metrics computed on the training thread (their
  statistics share one pass per tensor, so they cost as one), and one per offloaded metric
  (saturation, spectral norms, CKA), a multiple of the first: the interval whose cost per step
  is largest moves up a ladder (1, 2, 3, then 4, 5, 6 and 7 times a power of two: 4, 5, 6, 7, 8,
  10, 12, 14, 16, 20, ..., each step at most 1.25×) until the total fits, at most
  ``max_interval`` (the largest value of the ladder under it: 96 for 100). A step ``k`` is
  recorded when ``k % interval == 0``, so the steps of an offloaded metric are also steps of the
  statistics, and every rank records the same steps. Network-wide values logged with
  ``Probe.log`` (``loss``, ``train_accuracy``) cost one scalar and are recorded every step
  (under torch.distributed they follow the training-thread interval, so that no collective is
  added between recorded steps);
* **what it owes**: what the run has cost so far beyond the budget (the warm-up, recorded in full
  before anything was known; the steps recorded in full after trouble; a plan that turned out
  dearer than measured) is a debt, paid back over the next :attr:`Budget.payback` steps by a
  sparser plan (its target is never below half the budget, so its intervals are at most about
  twice those the budget alone allows); once it is paid, the plan goes back to the budget's own. A run that stays under
  the budget saves nothing for later: the debt is never negative;
* **when it changes**: at recorded steps at least :attr:`Budget.period` steps apart, with
  hysteresis (sparser as soon as the measured cost exceeds the budget, denser only when the
  denser plan stays under 60% of it); a decision applies from the first step nobody asked about
  yet, so the answer for step ``k + 1`` given at the end of step ``k`` never changes. Under
  torch.distributed each rank's proposal travels through the merge of the recorded step (the
  largest interval of any rank is taken, as the slowest rank sets the pace), so all ranks adopt
  the same plan at the same step;
* **trouble**: :class:`TroubleWatch` checks every logged loss, and the gradient norm of every
  recorded step (from the layers' ``weight_grads``/``bias_grads`` norms), for NaN/Inf and for a
  spike (a robust z-score over the recent values); when one fires, the next
  :attr:`Budget.trouble_steps` steps are recorded in full whatever the budget says.

Example:
    >>> budget = Budget(0.05, max_interval=100, warmup=2)
    >>> budget.register("stats", expensive=False)
    >>> [budget.records("stats", k) for k in range(4)]
    [True, True, True, True]
    >>> budget.schedule()
    {'stats': 1}
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from sonde import background as background_time
from sonde.errors import ConfigError
from sonde.metrics.base import Capture, Metric
from sonde.records import NETWORK, Record
from sonde.topics import SCHEDULE_TOPIC

__all__ = ["NOT_FINITE", "SCHEDULE_TOPIC", "Budget", "PlanState", "TroubleWatch"]

log = logging.getLogger("sonde")

#: The group of the metrics computed on the training thread (they share one interval).
TRAINING_THREAD = ""
#: What sonde costs at every step, recorded or not (the loss, the flush): counted, never spaced.
EVERY_STEP = "(every step)"


def interval_at_most(n: int) -> int:
    """The largest interval ≤ ``n`` (n ≥ 1) on the ladder the budget chooses from: 1, 2, 3, then
    4, 5, 6 and 7 times a power of two (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...), each at most 1.25
    times the one before.

    Example:
        >>> interval_at_most(100), interval_at_most(10), interval_at_most(9), interval_at_most(3)
        (96, 10, 8, 3)
    """
    if n < 4:
        return n
    shift = n.bit_length() - 3
    return (n >> shift) << shift


def next_interval(n: int) -> int:
    """The smallest interval on the ladder (:func:`interval_at_most`) above ``n``.

    Example:
        >>> [next_interval(n) for n in (1, 3, 7, 8, 9, 14, 96)]
        [2, 4, 8, 10, 10, 16, 112]
    """
    if n < 4:
        return n + 1
    shift = n.bit_length() - 3
    return ((n >> shift) + 1) << shift


def ordinal(n: int) -> str:
    """``"every step"``, ``"every 2nd step"``, ``"every 4th step"``...

    Example:
        >>> ordinal(1), ordinal(2), ordinal(3), ordinal(64)
        ('every step', 'every 2nd step', 'every 3rd step', 'every 64th step')
    """
    if n == 1:
        return "every step"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"every {n}{suffix} step"


class Budget:
    """Chooses each metric's interval so that monitoring stays under ``fraction`` of training time.

    Args:
        fraction: the share of training time monitoring may take (0.05: 5%).
        max_interval: no metric goes longer than this many steps without a value.
        warmup: the first steps, recorded in full while the cost is measured.
        clock: seconds, monotonic (tests pass a fake one).
        background: CPU seconds sonde's background threads spent so far
            (:func:`sonde.background.spent`; tests pass a fake one).

    The probe calls :meth:`register` for each metric it budgets, :meth:`records` to ask whether a
    metric records at a step, :meth:`add_own_time` for the time spent in its own calls,
    :meth:`add_metric_time` for an offloaded metric's time, :meth:`step_ended` at each train
    step's boundary, and :meth:`adopt` with the (merged) proposal at recorded steps.
    """

    #: Steps between two decisions, at least.
    period: ClassVar[int] = 8
    #: Steps recorded in full after trouble (NaN/Inf or a spike of the loss).
    trouble_steps: ClassVar[int] = 5
    #: Unchanged decisions after which the intervals count as settled (logged, recorded).
    settle: ClassVar[int] = 1
    #: Steps over which a debt (cost beyond the budget so far) is paid back.
    payback: ClassVar[int] = 64

    def __init__(self, fraction: float = 0.05, max_interval: int = 100, *, warmup: int = 4,
                 clock: Callable[[], float] = time.perf_counter,
                 background: Callable[[], float] = background_time.spent) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"budget= expects a fraction of training time in (0, 1], got {fraction!r}")
        if isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval < 1:
            raise ConfigError(f"max_interval= expects a positive int, got {max_interval!r}")
        self.fraction = float(fraction)
        self.max_interval = max_interval
        self.cap = interval_at_most(max_interval)
        self.warmup = max(1, warmup)
        self.clock = clock
        self.background = background
        self.groups: dict[str, str] = {}  # metric name -> its group (TRAINING_THREAD or its own name)
        self.free: set[str] = set()  # metric names recorded every step
        self.intervals: dict[str, int] = {}  # group -> interval now decided
        self._steady: dict[str, int] = {}  # group -> interval the budget alone allows (no debt)
        self._plans: list[tuple[int, dict[str, int]]] = [(0, {})]  # (from step, intervals by group)
        self._forced: list[tuple[int, int]] = []  # [start, end) step ranges recorded in full
        self.asked = -1  # the highest step anyone asked about: decisions apply after it
        #: A proposal for the other ranks: trouble seen here since the last recorded step.
        self.trouble_seen = False
        self.estimate = 0.0  # the measured cost of the plan in force, as a fraction of the step
        #: Seconds of monitoring beyond the budget so far, as of the last decision (never negative).
        self.debt = 0.0
        self.paying = False  # the plan in force pays a debt back (merged across ranks)
        self.settled = False
        self._stable = 0
        self._last_decision = -1
        self._informed = False  # a decision has seen recorded and unrecorded steps measured
        self._reported: dict[str, int] | None = None
        # measurements
        self._mark: float | None = None
        self._own_now = 0.0  # sonde's training-thread time since the last boundary
        self._metric_now = 0.0  # of which offloaded metrics' updates
        self._recorded_steps: deque[tuple[float, float]] = deque(maxlen=32)  # (duration, own), cheap part
        self._unrecorded_steps: deque[tuple[float, float, bool]] = deque(maxlen=32)  # (duration, own, after)
        # how much longer each unrecorded step right after a recorded one took than the median of the
        # other unrecorded steps then (it refills the caches the recording filled)
        self._after_steps: deque[float] = deque(maxlen=16)
        self._previous_recorded = False
        self._spill = 0.0  # what a recording costs the step after it, as last measured
        # sonde's background CPU seconds (sonde.background) at the end of each recent recorded step
        self._background_marks: deque[float] = deque(maxlen=33)
        self._metric_time: dict[str, float] = {}  # offloaded metric -> seconds (training thread + worker)
        self._metric_count: dict[str, int] = {}  # offloaded metric -> steps it was recorded at
        # what the steps since the last settling of the debt cost: steps, recorded steps and their
        # seconds on the training thread, offloaded metrics' seconds, background CPU seconds when
        # they began
        self._owed_steps = 0
        self._owed_recorded = 0
        self._owed_after = 0
        self._owed_time = 0.0
        self._owed_metric = 0.0
        self._owed_background: float | None = None

    # -- what is budgeted ---------------------------------------------------------------------
    def register(self, name: str, *, expensive: bool, free: bool = False) -> None:
        """Budget metric ``name``: ``expensive`` (offloaded) metrics get an interval of their own,
        the others share the training thread's; ``free`` ones are recorded every step."""
        if free:
            self.free.add(name)
            return
        group = name if expensive else TRAINING_THREAD
        self.groups[name] = group
        self.intervals.setdefault(group, 1)
        self._steady.setdefault(group, 1)
        self._plans[-1][1].setdefault(group, 1)

    def schedule(self) -> dict[str, int]:
        """Each budgeted metric's interval in steps, as decided now."""
        out = {name: self.intervals[group] for name, group in self.groups.items()}
        out.update({name: 1 for name in self.free})
        return dict(sorted(out.items()))

    # -- the questions ------------------------------------------------------------------------
    def records(self, name: str, step: int) -> bool:
        """Whether metric ``name`` records at train ``step``; the answer never changes afterwards."""
        if step > self.asked:
            self.asked = step
        if step < self.warmup or name in self.free:
            return True
        if self._forced and any(start <= step < end for start, end in self._forced):
            return True
        group = self.groups.get(name, TRAINING_THREAD)
        plans = self._plans
        for start, intervals in reversed(plans):
            if start <= step:
                return step % intervals.get(group, 1) == 0
        return True

    def recorded(self, step: int) -> bool:
        """Whether any budgeted metric that costs something records at ``step``."""
        return any(self.records(name, step) for name in self.groups) if self.groups else False

    # -- measuring ----------------------------------------------------------------------------
    def add_own_time(self, seconds: float) -> None:
        """Time spent on the training thread inside sonde's own calls (publish, flush)."""
        self._own_now += seconds

    def add_metric_time(self, name: str, seconds: float, *, training_thread: bool) -> None:
        """Time an offloaded metric took (its update on the training thread, or its compute on
        the worker)."""
        if name in self.groups and self.groups[name] != TRAINING_THREAD:
            self._metric_time[name] = self._metric_time.get(name, 0.0) + seconds
            self._owed_metric += seconds
            if training_thread:
                self._metric_now += seconds

    def step_ended(self, step: int) -> None:
        """Train ``step`` ended (after its flush): its duration joins the recorded or unrecorded ones."""
        now = self.clock()
        recorded = self.recorded(step)
        if recorded:
            for name, group in self.groups.items():
                if group != TRAINING_THREAD and self.records(name, step):
                    self._metric_count[name] = self._metric_count.get(name, 0) + 1
        if self._mark is not None and step > 0:  # step 0 pays for first calls
            duration = now - self._mark - self._metric_now
            self._owed_steps += 1
            if self._owed_background is None:
                self._owed_background = self.background()
            if recorded:
                self._owed_recorded += 1
                self._owed_time += duration
                self._recorded_steps.append((duration, max(0.0, self._own_now - self._metric_now)))
                self._background_marks.append(self.background())
            else:
                if self._previous_recorded:
                    self._owed_after += 1
                    others = [d for d, _, after in self._unrecorded_steps if not after]
                    if others:
                        self._after_steps.append(duration - statistics.median(others))
                self._unrecorded_steps.append((duration, self._own_now, self._previous_recorded))
        self._previous_recorded = recorded
        self._mark = now
        self._own_now = 0.0
        self._metric_now = 0.0

    def costs(self) -> tuple[float, dict[str, float]] | None:
        """``(unmonitored step seconds, {group: seconds per recording})``, or None before there
        are enough measurements. What sonde's own calls take at every step (the loss, recorded
        every step; the flush) is the group :data:`EVERY_STEP`, whose interval is always 1. A
        recording's cost includes what it costs the step after it: the median of how much longer
        those steps took than the other unrecorded steps of their time (the caches the recording
        filled are refilled there)."""
        if len(self._recorded_steps) < 3:
            return None
        durations = [d for d, _ in self._recorded_steps]
        own = statistics.median(o for _, o in self._recorded_steps)
        always = 0.0
        if len(self._unrecorded_steps) >= 3:
            always = statistics.median(o for _, o, _ in self._unrecorded_steps)
            self._spill = 0.0 if len(self._after_steps) < 3 else max(0.0, statistics.median(self._after_steps))
            others = [d for d, _, after in self._unrecorded_steps if not after]
            if len(others) >= 3:
                unrecorded = statistics.median(others)
            else:  # every other step recorded: each unrecorded step follows a recorded one
                unrecorded = statistics.median(d for d, _, _ in self._unrecorded_steps) - self._spill
            base = unrecorded - always
            cheap = max(own - always, statistics.median(durations) - unrecorded) + self._spill
        else:
            cheap = own
            base = statistics.median(durations) - own
        marks = self._background_marks
        if len(marks) >= 2:  # what the sinks' threads spent per recorded step (their Records, mostly)
            cheap += (marks[-1] - marks[0]) / (len(marks) - 1)
        costs = {TRAINING_THREAD: cheap} if TRAINING_THREAD in self.intervals else {}
        if always > 0:
            costs[EVERY_STEP] = always
        for name, group in self.groups.items():
            if group != TRAINING_THREAD:
                costs[group] = self._metric_time.get(name, 0.0) / max(self._metric_count.get(name, 0), 1)
        return max(base, 1e-9), costs

    # -- deciding -----------------------------------------------------------------------------
    def plan(self, base: float, costs: dict[str, float], share: float) -> dict[str, int]:
        """The densest intervals whose cost stays under ``share`` × ``base``: the group whose cost
        per step is largest moves to the next interval first; offloaded metrics are never denser
        than the training thread's, and recorded at a multiple of its interval."""
        intervals = dict.fromkeys(costs, 1)
        target = share * base
        while sum(c / intervals[g] for g, c in costs.items()) > target:
            open_ = [g for g in costs if intervals[g] < self.cap and g != EVERY_STEP]
            if not open_:
                break
            group = max(open_, key=lambda g: costs[g] / intervals[g])
            intervals[group] = min(self.cap, next_interval(intervals[group]))
        intervals.pop(EVERY_STEP, None)
        return self._aligned(intervals)

    def _aligned(self, intervals: dict[str, int]) -> dict[str, int]:
        """Each offloaded group's interval as a multiple of the training thread's (the smallest at
        least as long; the largest within the cap where that one is past it), so that a step
        recording an offloaded metric records the statistics too."""
        floor = intervals.get(TRAINING_THREAD, 1)
        out = {}
        for group, interval in intervals.items():
            multiple = max(1, -(-interval // floor)) * floor
            if multiple > self.cap:
                multiple = max(1, self.cap // floor) * floor
            out[group] = multiple
        return out

    def proposal(self) -> np.ndarray:
        """This rank's proposal (each group's interval, sorted by group, then the trouble flag and
        whether the plan pays a debt back), for the merge across ranks (the largest of every
        rank's is taken)."""
        measured = self.costs()
        paying = False
        if measured is None:
            wanted = dict(self.intervals)
        else:
            base, costs = measured
            self._steady = wanted = self._hysteresis(base, costs)
            if len(self._unrecorded_steps) >= 3:  # the unmonitored step is known: what was spent too
                self._settle_debt(base, costs.get(EVERY_STEP, 0.0))
            if self.debt > 0:
                share = max(0.5 * self.fraction, self.fraction - self.debt / (self.payback * base))
                owed = self.plan(base, costs, share)
                paying = any(owed.get(g, i) > i for g, i in wanted.items())
                wanted = self._aligned({g: max(i, owed.get(g, i)) for g, i in wanted.items()})
        if len(self._unrecorded_steps) < 3 and wanted.get(TRAINING_THREAD, 2) < 2:
            # no unrecorded step measured yet: leave some out, to measure what recording costs
            wanted = {g: max(i, 2) for g, i in wanted.items()}
        elif wanted.get(TRAINING_THREAD, 3) < 3 and len(self._after_steps) < 3:
            # every step or every other one leaves no unrecorded step that does not follow a
            # recording: leave two out for a while, to measure what a recording costs the next step
            wanted = self._aligned({g: max(i, 3) for g, i in wanted.items()})
        values = [float(wanted[g]) for g in sorted(self.intervals)]
        return np.array([*values, 1.0 if self.trouble_seen else 0.0, 1.0 if paying else 0.0], dtype=np.float64)

    def _settle_debt(self, base: float, always: float) -> None:
        """Add what the steps since the last call cost beyond the budget to :attr:`debt`: each
        recorded step's time over ``base`` (the unmonitored step), ``always`` per unrecorded step
        (what sonde takes at every step: an unrecorded step's own noise is not sonde's) and the
        measured spill per step after a recorded one, the offloaded metrics' and the background
        threads' seconds, less ``fraction`` × ``base`` per step. The debt never goes below zero."""
        if self._owed_steps == 0:
            return
        now = self.background()
        background = now - (now if self._owed_background is None else self._owed_background)
        spent = (self._owed_time - self._owed_recorded * base + (self._owed_steps - self._owed_recorded) * always
                 + self._owed_after * self._spill + self._owed_metric + background)
        self.debt = max(0.0, self.debt + spent - self.fraction * base * self._owed_steps)
        self._owed_steps = self._owed_recorded = self._owed_after = 0
        self._owed_time = self._owed_metric = 0.0
        self._owed_background = now

    def _hysteresis(self, base: float, costs: dict[str, float]) -> dict[str, int]:
        """The plan the budget alone allows, changed from the last one only when that one costs
        more than the budget, or a denser one costs under 60% of it."""
        sparse = self.plan(base, costs, self.fraction)
        dense = self.plan(base, costs, 0.6 * self.fraction)
        out = {}
        for group, now in self._steady.items():
            if sparse.get(group, now) > now:
                out[group] = sparse[group]
            elif dense.get(group, now) < now:
                out[group] = dense[group]
            else:
                out[group] = now
        return out

    def due(self, step: int) -> bool:
        """Whether a decision is taken at recorded ``step`` (the same on every rank): the first at
        the end of the warm-up, then at least :attr:`period` steps apart, or sooner while no
        decision has seen both kinds of step measured (three recorded and three unrecorded ones).
        Every rank records and leaves out the same steps, so every rank's answer is the same."""
        if step < self.warmup:
            return False
        if self._last_decision < 0 or step - self._last_decision >= self.period:
            return True
        return not self._informed and len(self._unrecorded_steps) >= 3

    def adopt(self, proposal: Any, step: int) -> None:
        """Adopt ``proposal`` (:meth:`proposal`, merged across ranks) at recorded ``step``: a change
        applies from the first step nobody asked about yet (step + 2 at the earliest)."""
        self._last_decision = step
        self._informed = len(self._unrecorded_steps) >= 3
        groups = sorted(self.intervals)
        values = np.asarray(proposal, dtype=np.float64).reshape(-1)
        if values.size != len(groups) + 2:
            return
        start = max(step + 2, self.asked + 1)
        if values[-2] > 0:
            self.force(start)
        self.trouble_seen = False
        self.paying = bool(values[-1] > 0)
        # the largest of each rank's intervals, aligned again (every rank computes the same)
        wanted = self._aligned({g: min(self.cap, max(1, round(v))) for g, v in zip(groups, values[:-2], strict=True)})
        measured = self.costs()
        if measured is not None:
            base, costs = measured
            self.estimate = sum(c / wanted.get(g, 1) for g, c in costs.items()) / base
        if wanted == self.intervals:
            self._stable += 1
            if self._stable >= self.settle and not self.paying:  # paying back is a passing plan
                self.settled = True
            return
        self.intervals = wanted
        self._plans.append((start, dict(wanted)))
        del self._plans[:-4]  # questions are about the current and next steps
        self._stable = 0
        self.settled = False

    def force(self, start: int) -> tuple[int, int]:
        """Record steps ``start`` … ``start + trouble_steps - 1`` in full; returns the range."""
        start = max(start, self.asked + 1)
        window = (start, start + self.trouble_steps)
        self._forced = [(s, e) for s, e in self._forced if e > self.asked] + [window]
        return window

    def settled_records(self, run: str, step: int) -> list[Record]:
        """Once the intervals settle (and again each time they settle on new ones): one Record per
        budgeted metric (topic :data:`~sonde.topics.SCHEDULE_TOPIC`, value: its interval; the
        network-wide values recorded every step are left out) and one log line."""
        if not self.settled or self._reported == self.intervals:
            return []
        self._reported = dict(self.intervals)
        percent = f"{self.fraction:.0%}"
        intervals = {name: self.intervals[group] for name, group in sorted(self.groups.items())}
        records = [Record(run, step, "train", NETWORK, SCHEDULE_TOPIC, name, float(interval),
                          message=f"recorded {ordinal(interval)} to stay under {percent}")
                   for name, interval in intervals.items()]
        by_interval: dict[int, list[str]] = {}
        for name, interval in intervals.items():
            by_interval.setdefault(interval, []).append(name)
        parts = "; ".join(f"{', '.join(names)} {ordinal(i)}" for i, names in sorted(by_interval.items()))
        log.info("sonde: overhead budget %s: %s (measured cost %.1f%% of a step; the loss every step, and every "
                 "metric at the %d steps after it turns NaN/Inf or spikes)", percent, parts, 100 * self.estimate,
                 self.trouble_steps)
        if self.estimate > self.fraction and all(i >= self.cap for i in self.intervals.values()):
            log.warning("sonde: monitoring costs %.1f%% of a step even at the longest interval (max_interval): "
                        "over the %s budget. What every step costs (the loss logged, the hooks that see each "
                        "forward) weighs most on small, fast steps; layers=, topics= or a larger budget= change it",
                        100 * self.estimate, percent)
        return records


class PlanState(Metric):
    """Carries a rank's :meth:`Budget.proposal` through the merge of a recorded step, so that every
    rank adopts the same intervals (the merge takes the largest); in one process, the proposal itself."""

    name = "schedule"
    topics = (SCHEDULE_TOPIC,)

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget
        self.step = 0
        self.add_state("proposal", default=None, reduce="max")

    def __deepcopy__(self, memo: dict[int, Any]) -> PlanState:
        return self  # one instance per probe: it holds the budget

    def update(self, capture: Capture) -> None:
        self.step = capture.step
        self.stage("proposal", self.budget.proposal())

    def compute(self) -> dict[str, Any]:
        if self.state["proposal"] is not None:
            self.budget.adopt(self.state["proposal"], self.step)
        return {}


#: What :meth:`TroubleWatch.observe` reports for a NaN or infinite value.
NOT_FINITE = "NaN/Inf"


class TroubleWatch:
    """NaN/Inf and spikes of a per-step scalar (the loss), checked at negligible cost.

    A CPU value is read at once; an accelerator's is copied (non-blocking) into pinned host memory
    with an event, and checked at a later call once the event says the copy is done, so the
    training thread never waits for the device. A spike is a value more than ``z`` robust standard
    deviations (1.4826 × the median absolute deviation, at least ``floor`` × the median) above the
    median of the last ``window`` values, once ``min_history`` values are known. One trouble is
    reported per episode: the next is reported only once a value is back in range.

    Example:
        >>> watch = TroubleWatch()
        >>> [watch.observe(k, torch.tensor(1.0 + 0.01 * (k % 3))) for k in range(12)][-1] is None
        True
        >>> watch.observe(12, torch.tensor(float("nan")))
        (12, 'NaN/Inf')
    """

    def __init__(self, *, window: int = 50, z: float = 10.0, floor: float = 0.05, min_history: int = 10) -> None:
        self.z = z
        self.floor = floor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)
        self.pending: deque[tuple[int, torch.Tensor, Any]] = deque()  # (step, host buffer, event)
        self.in_trouble = False

    def observe(self, step: int, value: torch.Tensor, *, defer: bool | None = None) -> tuple[int, str] | None:
        """Note ``value`` logged at ``step``; returns ``(step, what)`` for the first trouble found
        among the values read back so far (this one, if it could be read at once), else None.

        ``defer``: read the value back later (default: when it lives on an accelerator).
        """
        tensor = value.detach()
        if tensor.numel() != 1:
            tensor = tensor.float().mean()
        if defer is None:
            defer = tensor.device.type != "cpu"
        found = None
        if defer:
            buffer, event = self._copy(tensor)
            self.pending.append((step, buffer, event))
            while self.pending:
                at, held, done = self.pending[0]
                if done is not None and not done.query():
                    break
                self.pending.popleft()
                found = found or self._check(at, float(held))
            return found
        return self._check(step, float(tensor))

    @staticmethod
    def _copy(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A host copy of the 0-d ``tensor`` and an event whose ``query()`` says when it is done
        (None: done already). On CUDA the copy is non-blocking, into pinned memory."""
        if tensor.device.type != "cuda":
            return tensor.to("cpu", torch.float64).reshape(()), None
        buffer = torch.empty((), dtype=torch.float64, pin_memory=True)
        buffer.copy_(tensor.reshape(()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buffer, event

    def _check(self, step: int, value: float) -> tuple[int, str] | None:
        what = None
        if not math.isfinite(value):
            what = NOT_FINITE
        elif len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            mad = statistics.median(abs(v - median) for v in self.history)
            scale = max(1.4826 * mad, self.floor * abs(median), 1e-12)
            if (value - median) / scale > self.z:
                what = f"spike ({value:.4g} against a recent median of {median:.4g})"
        if what is None:
            self.history.append(value)
            self.in_trouble = False
            return None
        if math.isfinite(value):
            self.history.append(value)
        if self.in_trouble:
            return None
        self.in_trouble = True
        return step, what
