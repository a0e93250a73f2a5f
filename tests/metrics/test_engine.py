"""The MetricEngine: the lifecycle the bus and the evaluator share."""

from __future__ import annotations

import torch

from sonde.metrics import Alerts, Mean
from sonde.metrics.base import Capture, Metric
from sonde.metrics.engine import MetricEngine
from sonde.records import Record


def capture(value: float, step: int, phase: str = "train") -> Capture:
    return Capture(torch.full((4,), value), layer="fc", topic="activations", phase=phase, step=step)


def test_compute_every_accumulates_and_only_limits_what_computes() -> None:
    engine = MetricEngine("r")
    slow, fast = Mean(compute_every=2), Mean()
    for step in range(3):
        engine.update(("fc", "activations"), [slow, fast], capture(step, step))
        records = engine.flush("train", step, only=[fast] if step == 2 else None)
        assert [r.value for r in records if r.metric == "mean"] == {0: [0.0, 0.0], 1: [1.0], 2: [2.0]}[step]
    assert engine.accumulating()  # slow holds steps 1..2, not asked for at step 2
    assert [r.value for r in engine.flush("train", 2, final=True)] == [1.5]


def test_epoch_end_computes_and_resets_epoch_metrics_and_calls_boundaries() -> None:
    seen: list[str] = []

    class Boundaries(Metric):
        name = "boundaries"

        def update(self, capture: Capture) -> None: ...

        def compute(self) -> dict[str, float]:
            return {}

        def boundary(self, kind: str) -> None:
            seen.append(kind)

    epoch = Mean(compute_every=100, reset="epoch")
    engine = MetricEngine("r", [Boundaries()])
    engine.instances["k"] = [epoch]
    engine.update(("fc", "activations"), [epoch], capture(1.0, 1))
    engine.end_epoch()
    assert [r.value for r in engine.flush("train", 1)] == [1.0]
    assert epoch.updates == 0 and seen == ["epoch"]
    engine.end_run()
    assert seen == ["epoch", "run"]


def test_watchers_add_alerts_and_a_failing_metric_never_raises() -> None:
    class Broken(Metric):
        name = "broken"

        def update(self, capture: Capture) -> None:
            raise RuntimeError("boom")

    engine = MetricEngine("r", [Alerts(warmup=0)])
    engine.update(("fc", "activations"), [Broken()], capture(0.0, 0))
    assert engine.flush("train", 0) == []
    assert engine.report_failures() == {"broken": 1}
    alerts = engine.watch([Record("r", 0, "train", "fc", "activations", "zero_frac", 1.0)])
    assert [a.metric for a in alerts] == ["alert"]
