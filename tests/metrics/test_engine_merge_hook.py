"""The engine's ``merge_ranks`` hook: called with the instances about to compute, before compute;
a refusal drops their state; state kept across computes is given back after computing."""

from __future__ import annotations

from typing import Any

import torch

from sonde.metrics import Mean
from sonde.metrics.base import Capture, Metric
from sonde.metrics.engine import MetricEngine


class Doubling:
    """A stand-in for the ranks: another rank saw the same batch, so every count and sum doubles."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.calls: list[tuple[str, int, bool, list[tuple[str, str, str]]]] = []
        self.restored = 0
        self._own: list[tuple[Metric, dict[str, Any]]] = []

    def merge(self, phase: str, step: int, final: bool, due: list[tuple[str, str, Metric]]) -> bool:
        self.calls.append((phase, step, final, [(layer, topic, m.name) for layer, topic, m in due]))
        self._own = [(m, dict(m.state)) for _, _, m in due]
        for _, _, metric in due:
            summary = metric.state["summary"].copy()
            summary[0] *= 2  # n doubles; the mean stays; m2 doubles
            summary[2] *= 2
            metric.state["summary"] = summary
        return self.accept

    def restore(self) -> None:
        self.restored += 1
        for metric, state in self._own:
            if metric.reset_policy != "compute":
                metric.state = state


def update(engine: MetricEngine, metric: Metric, values: list[float], step: int) -> None:
    engine.update(("fc", "activations"), [metric],
                  Capture(torch.tensor(values), layer="fc", topic="activations", step=step))


def test_the_hook_sees_the_due_instances_before_compute() -> None:
    engine = MetricEngine("run")
    hook = Doubling()
    engine.merge_ranks = hook
    mean = Mean()
    update(engine, mean, [1.0, 3.0], 0)
    records = engine.flush("train", 0)
    assert hook.calls == [("train", 0, False, [("fc", "activations", "mean")])]
    assert [(r.metric, r.value) for r in records] == [("mean", 2.0)]
    assert hook.restored == 1
    assert engine.flush("train", 1) == []  # nothing recorded: the hook is still called (the ranks meet)
    assert hook.calls[-1] == ("train", 1, False, [])


def test_a_refused_merge_computes_nothing_and_drops_the_state() -> None:
    engine = MetricEngine("run")
    engine.merge_ranks = Doubling(accept=False)
    mean = Mean()
    update(engine, mean, [1.0, 3.0], 0)
    assert engine.flush("train", 0) == []
    assert mean.state["summary"] is None
    assert not engine.accumulating()


def test_state_kept_across_computes_goes_on_from_the_ranks_own() -> None:
    engine = MetricEngine("run")
    hook = Doubling()
    engine.merge_ranks = hook
    mean = Mean(reset="never")
    update(engine, mean, [1.0, 3.0], 0)
    engine.flush("train", 0)
    assert mean.state["summary"][0] == 2  # this rank's two values, not the merged four
    update(engine, mean, [5.0], 1)
    records = engine.flush("train", 1)
    assert mean.state["summary"][0] == 3
    # The merge saw 3 values of this rank (1, 3, 5: mean 3) and doubled them: the mean is 3.
    assert [(r.metric, r.value) for r in records] == [("mean", 3.0)]
