"""Routes captures to metric instances; the :class:`~sonde.metrics.engine.MetricEngine` does the rest.

One metric instance exists per (phase, layer, topic, metric); it is cloned lazily from the
template the user configured. A capture reaches the instances whose schedule accepts the
step (the metric's own ``every=``, else the bus's :attr:`Bus.budget` when it has one, else the
bus's schedule; evaluation passes are recorded whenever they happen), and the bus hands them to its
engine, which runs the metric lifecycle (the same code the server's evaluator runs): at the end
of a step, :meth:`Bus.flush` moves every staged partial state to the host in one batched
transfer per device and folds it in; each metric whose ``compute_every`` accepts the step
computes (an offloaded one on the background worker, see :mod:`sonde.worker`) and is reset as
its ``reset`` says; the others keep accumulating. An evaluation flush always computes (an eval
pass is already one value over all its batches). Metrics of Records (``derived``) compute from
the step's values; watchers (``watches``, such as alerts) read every Record that is emitted.

Example:
    >>> import torch
    >>> from sonde.metrics import Mean
    >>> bus = Bus("run", [Mean()], topics=["activations"], schedule=lambda step: True)
    >>> bus.publish("fc", "activations", torch.ones(3), phase="train", step=0)
    >>> [(r.layer, r.metric, r.value) for r in bus.flush("train", 0)]
    [('fc', 'mean', 1.0)]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch

from sonde.budget import Budget
from sonde.metrics.base import Capture, Metric, TensorMemo
from sonde.metrics.engine import MetricEngine, to_host
from sonde.records import Record
from sonde.schedules import Schedule
from sonde.worker import ComputeTask, MetricTask, Worker

__all__ = ["Bus", "to_host"]


class Bus:
    """Subscriptions of metrics to topics, with their schedules; the lifecycle is its :attr:`engine`'s."""

    def __init__(self, run: str, metrics: Sequence[Metric], *, topics: Iterable[str], schedule: Schedule) -> None:
        self.run = run
        self.schedule = schedule
        wanted = set(topics)
        self.templates: dict[str, list[Metric]] = {}
        for metric in metrics:
            for topic in metric.topics:
                if topic in wanted:
                    self.templates.setdefault(topic, []).append(metric)
        for metric in metrics:  # metrics of Records need their inputs on the topics they read
            for topic, source in metric.reads_topics.items():
                if topic not in wanted:
                    continue
                for needed in metric.requires:
                    provider = next((m for m in metrics if needed in m.emits()), None)
                    subscribed = self.templates.setdefault(source, [])
                    if provider is not None and provider not in subscribed:
                        subscribed.append(provider)
        configured = list({id(m): m for templates in self.templates.values() for m in templates}.values())
        self.engine = MetricEngine(run, configured, watchers=[m for m in metrics if m.watches])
        self._worker: Worker | None = None
        self.layer_types: dict[str, str] = {}  # layer name -> module class name, set by the probe
        self._instances = self.engine.instances  # (phase, layer, topic) -> clones of the templates
        self._wants_cache: tuple[int, dict[str, bool]] = (-1, {})
        self.memo = TensorMemo()
        #: The overhead budget that spaces the recordings of metrics without a schedule of their own
        #: (:mod:`sonde.budget`; set by the probe when ``every=`` is not given), which also hears
        #: what offloaded metrics cost.
        self.budget: Budget | None = None

    @property
    def worker(self) -> Worker | None:
        """The background worker offloaded computes run on (set by the probe when a metric offloads)."""
        return self._worker

    @worker.setter
    def worker(self, worker: Worker | None) -> None:
        self._worker = worker
        self.engine.offload = None if worker is None else _offload_to(worker, self.run, self)
        self.engine.defer = None if worker is None else _defer_to(worker)

    @property
    def watchers(self) -> list[Metric]:
        return self.engine.watchers

    @property
    def topics(self) -> set[str]:
        """Topics at least one metric subscribes to."""
        return set(self.templates)

    def scheduled(self, metric: Metric, step: int) -> bool:
        """Whether ``metric`` records at train ``step``: its own schedule, else the budget's, else the bus's."""
        if metric.schedule is not None:
            return bool(metric.schedule(step))
        if self.budget is not None:
            return self.budget.records(metric.name, step)
        return bool(self.schedule(step))

    def wants(self, topic: str, step: int, phase: str = "train") -> bool:
        """Whether any metric records ``topic`` at ``step``: lets hooks skip work cheaply."""
        templates = self.templates.get(topic)
        if not templates:
            return False
        if phase == "eval":
            return True
        cached_step, cache = self._wants_cache
        if cached_step != step:
            cache = {}
            self._wants_cache = (step, cache)
        if topic not in cache:
            cache[topic] = any(self.scheduled(m, step) for m in templates)
        return cache[topic]

    def publish(
        self,
        layer: str,
        topic: str,
        tensor: torch.Tensor,
        *,
        phase: str,
        step: int,
        labels: torch.Tensor | None = None,
        minus: torch.Tensor | None = None,
        copy_to: torch.Tensor | None = None,
    ) -> None:
        """Hand one captured tensor to every metric subscribed to it at this step.

        ``minus``: the captured value is ``tensor - minus`` (see :class:`Capture`). ``copy_to``:
        holds a copy of ``tensor`` when this returns, made during the metrics' pass if they read it.
        """
        key = (phase, layer, topic)
        instances = self._instances.get(key)
        if instances is None:
            instances = [m.clone() for m in self.templates.get(topic, ())]
            self._instances[key] = instances
        layer_type = self.layer_types.get(layer) or self.layer_types.get(layer.split(":")[0], "")
        capture = Capture(tensor, layer=layer, topic=topic, phase=phase, step=step, labels=labels, memo=self.memo,
                          layer_type=layer_type, minus=minus, copy_to=copy_to)
        due = [
            instance for template, instance in zip(self.templates.get(topic, ()), instances, strict=True)
            if phase != "train" or self.scheduled(template, step)
        ]
        budget = self.budget
        if budget is not None and any(instance.offload for instance in due):
            self._update_timed(budget, (layer, topic), due, capture)
        else:
            self.engine.update((layer, topic), due, capture)
        capture.finish()

    def _update_timed(self, budget: Budget, where: tuple[str, str], due: list[Metric], capture: Capture) -> None:
        """Update ``due``, timing each offloaded metric's update for the budget (the others share one pass)."""
        cheap = [instance for instance in due if not instance.offload]
        if cheap:
            self.engine.update(where, cheap, capture)
        for instance in due:
            if instance.offload:
                start = budget.clock()
                self.engine.update(where, [instance], capture)
                budget.add_metric_time(instance.name, budget.clock() - start, training_thread=True)

    def pending(self, phase: str) -> bool:
        return self.engine.pending(phase)

    def discard(self, phase: str) -> None:
        """Forget what was published in ``phase`` since the last flush (a pass that broke off)."""
        self.engine.discard(phase)

    def accumulating(self) -> bool:
        """Whether some metric holds recorded state that has not been computed yet."""
        return self.engine.accumulating()

    def end_epoch(self) -> None:
        """The current train step is the last of an epoch: at its flush, metrics with
        ``reset="epoch"`` compute (whatever ``compute_every`` says) and then start afresh."""
        self.engine.end_epoch()

    def flush(self, phase: str, step: int, *, final: bool = False) -> list[Record]:
        """Fold in what ``phase`` staged since the last flush, compute the metrics due at ``step``
        (all of them when ``final``), and return the Records computed here (offloaded ones follow
        from the worker). When the partials live on CUDA and the bus has a worker, the flush only
        starts their copy to the host: the worker waits for it and emits the step's Records
        (:meth:`MetricEngine.flush <sonde.metrics.engine.MetricEngine.flush>`), and this returns []."""
        self.memo.clear()
        return self.engine.flush(phase, step, final=final)

    def end_run(self) -> None:
        """After the last flush: tell the configured metrics the run ended (:meth:`Metric.boundary`)."""
        self.engine.end_run()

    def watch(self, records: list[Record]) -> list[Record]:
        """Records the watchers (alerts) add after reading ``records``; never raises."""
        return self.engine.watch(records)

    def report_failures(self) -> dict[str, int]:
        """At the end of the run: log each metric that failed more than once, with the count and its
        last error. Returns the counts by metric name."""
        return self.engine.report_failures()


def _offload_to(worker: Worker, run: str, bus: Bus) -> Callable[[Hashable, Metric, str, int, str, str], None]:
    def offload(key: Hashable, snapshot: Metric, phase: str, step: int, layer: str, topic: str) -> None:
        budget = bus.budget
        task = (MetricTask(snapshot, run=run, step=step, phase=phase, layer=layer, topic=topic) if budget is None
                else _TimedTask(budget, snapshot, run=run, step=step, phase=phase, layer=layer, topic=topic))
        worker.submit(key, task)

    return offload


class _TimedTask(MetricTask):
    """A metric's compute on the worker, its time told to the budget (the worker competes for the cores)."""

    def __init__(self, budget: Budget, metric: Metric, **where: Any) -> None:
        super().__init__(metric, **where)
        self.budget = budget

    def run(self) -> list[Any]:
        start = self.budget.clock()
        try:
            return super().run()
        finally:
            self.budget.add_metric_time(self.metric.name, self.budget.clock() - start, training_thread=False)


def _defer_to(worker: Worker) -> Callable[[Callable[[], list[Record]]], bool]:
    """The engine's ``defer``: a flush's host part as a task of its own on ``worker``, after the
    tasks queued before it; the worker hands its Records to the probe's sinks. False when the
    worker skipped it (its queue is full, or it is closed)."""
    numbers = itertools.count()

    def defer(finish: Callable[[], list[Record]]) -> bool:
        return worker.submit(("flush", next(numbers)), ComputeTask(finish, name="flush"))

    return defer
