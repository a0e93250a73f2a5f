"""Routes captures to metric instances and turns a finished step into Records.

One metric instance exists per (phase, layer, topic, metric); it is cloned lazily from the
template the user configured. A capture reaches the instances whose schedule accepts the
step (evaluation passes are recorded whenever they happen). At the end of a step,
:meth:`Bus.flush` moves every staged partial state to the host in one batched transfer per
device and folds it in. Then each metric whose ``compute_every`` accepts the step computes
(an offloaded one on the background worker, see :mod:`sonde.worker`) and is reset as its
``reset`` says; the others keep accumulating. An evaluation flush always computes (an eval
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

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from sonde.metrics.base import Capture, Metric, TensorMemo
from sonde.records import Record
from sonde.schedules import Schedule
from sonde.worker import MetricTask, Worker

__all__ = ["Bus", "to_host"]

log = logging.getLogger("sonde")


class Bus:
    """Subscriptions of metrics to topics, with their schedules, and the per-step flush."""

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
        self.watchers = [m for m in metrics if getattr(m, "watches", False)]
        self.worker: Worker | None = None  # set by the probe when a metric offloads its compute
        self.layer_types: dict[str, str] = {}  # layer name -> module class name, set by the probe
        self._instances: dict[tuple[str, str, str], list[Metric]] = {}
        self._touched: dict[str, dict[tuple[str, str], list[Metric]]] = {"train": {}, "eval": {}}
        # Instances holding state not computed yet (compute_every said "not now"), per phase.
        self._dirty: dict[str, dict[tuple[str, str], list[Metric]]] = {"train": {}, "eval": {}}
        self._epoch_end = False
        self._wants_cache: tuple[int, dict[str, bool]] = (-1, {})
        self.memo = TensorMemo()
        # Per failing metric: how often it failed and the last error (reported once, then counted at close).
        self._failures: dict[str, tuple[int, str]] = {}

    @property
    def topics(self) -> set[str]:
        """Topics at least one metric subscribes to."""
        return set(self.templates)

    def scheduled(self, metric: Metric, step: int) -> bool:
        return (metric.schedule or self.schedule)(step)

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
        for instance in due:
            try:
                instance.prepare(capture)
            except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                self._report(instance, exc)
        touched = self._touched[phase]
        for instance in due:
            try:
                instance.update(capture)
            except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                self._report(instance, exc)
                continue
            instance.updates += 1
            touched.setdefault((layer, topic), [])
            if instance not in touched[(layer, topic)]:
                touched[(layer, topic)].append(instance)
        capture.finish()

    def pending(self, phase: str) -> bool:
        return bool(self._touched[phase])

    def discard(self, phase: str) -> None:
        """Forget what was published in ``phase`` since the last flush (a pass that broke off)."""
        for instances in self._touched[phase].values():
            for metric in instances:
                metric.reset()
        self._touched[phase] = {}

    def accumulating(self) -> bool:
        """Whether some metric holds recorded state that has not been computed yet."""
        return any(self._dirty.values())

    def end_epoch(self) -> None:
        """The current train step is the last of an epoch: at its flush, metrics with
        ``reset="epoch"`` compute (whatever ``compute_every`` says) and then start afresh."""
        self._epoch_end = True

    def flush(self, phase: str, step: int, *, final: bool = False) -> list[Record]:
        """Fold in what ``phase`` staged since the last flush, compute the metrics due at ``step``
        (all of them when ``final``), and return the Records computed here (offloaded ones follow
        from the worker)."""
        touched = self._touched[phase]
        self._touched[phase] = {}
        self.memo.clear()
        dirty = self._dirty[phase]
        epoch_end = self._epoch_end and phase == "train"
        if not touched and not dirty and not epoch_end:
            return []
        host = to_host(value for instances in touched.values() for m in instances for _, value in m.staged)
        derived: list[tuple[str, str, Metric]] = []
        for key, instances in touched.items():
            for metric in instances:
                if getattr(metric, "derived", False):
                    derived.append((*key, metric))
                    continue
                try:
                    metric.absorb_staged(host)
                except Exception as exc:  # noqa: BLE001
                    self._report(metric, exc)
                    metric.reset()
                    continue
                waiting = dirty.setdefault(key, [])
                if metric not in waiting:
                    waiting.append(metric)
        records: list[Record] = []
        values: dict[tuple[str, str, str], Any] = {}  # what the metrics of Records read (their ``requires``)
        read = {name for _, _, metric in derived for name in metric.requires}
        # Touched keys first, in the order the step produced them (forward order for activations).
        order = [k for k in touched if k in dirty] + [k for k in dirty if k not in touched]
        for key in order:
            layer, topic = key
            kept: list[Metric] = []
            for metric in dirty[key]:
                forced = final or phase == "eval" or (epoch_end and metric.reset_policy == "epoch")
                if not (forced or metric.due(step)):
                    kept.append(metric)
                    continue
                for name, value in self._compute(metric, phase, step, layer, topic).items():
                    if name in read:
                        values[(layer, topic, name)] = value
                    records.append(Record(self.run, step, phase, layer, topic, name, value))
                if metric.reset_policy == "compute":
                    metric.reset()
            if kept:
                dirty[key] = kept
            else:
                del dirty[key]
        for layer, topic, metric in derived:
            try:
                result = metric.derive(values, layer, topic)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                self._report(metric, exc)
                result = {}
            for name, value in result.items():
                values[(layer, topic, name)] = value
                records.append(Record(self.run, step, phase, layer, topic, name, value))
            metric.reset()
        if epoch_end:
            self._epoch_end = False
            for instances in self._instances.values():
                for metric in instances:
                    if metric.reset_policy == "epoch":
                        metric.reset()
            self._boundary("epoch")
        return records

    def end_run(self) -> None:
        """After the last flush: tell the configured metrics the run ended (:meth:`Metric.boundary`)."""
        self._boundary("run")

    def _boundary(self, kind: str) -> None:
        seen: set[int] = set()
        for templates in self.templates.values():
            for metric in templates:
                if id(metric) not in seen:
                    seen.add(id(metric))
                    try:
                        metric.boundary(kind)
                    except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                        self._report(metric, exc)

    def _compute(self, metric: Metric, phase: str, step: int, layer: str, topic: str) -> dict[str, Any]:
        """Compute here, or hand a snapshot to the worker (then nothing is returned here)."""
        if metric.offload and self.worker is not None:
            task = MetricTask(metric.snapshot(), run=self.run, step=step, phase=phase, layer=layer, topic=topic)
            self.worker.submit((phase, layer, topic, id(metric)), task)
            return {}
        try:
            return metric.compute()
        except Exception as exc:  # noqa: BLE001 - monitoring must never break training
            self._report(metric, exc)
            return {}

    def watch(self, records: list[Record]) -> list[Record]:
        """Records the watchers (alerts) add after reading ``records``; never raises."""
        extra: list[Record] = []
        for watcher in self.watchers:
            try:
                extra.extend(watcher.watch(records))  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                self._report(watcher, exc)
        return extra

    def _report(self, metric: Metric, exc: Exception) -> None:
        """Log a metric's first failure; count the later ones for :meth:`report_failures`."""
        count, _ = self._failures.get(metric.name, (0, ""))
        self._failures[metric.name] = (count + 1, f"{type(exc).__name__}: {exc}")
        if count == 0:
            log.error(
                "sonde: metric %r failed (%s: %s); training goes on, its values are missing where it fails",
                metric.name, type(exc).__name__, exc,
            )

    def report_failures(self) -> dict[str, int]:
        """At the end of the run: log each metric that failed more than once, with the count and its
        last error (which may differ from the first one logged). Returns the counts by metric name."""
        for name, (count, last) in self._failures.items():
            if count > 1:
                log.error("sonde: metric %r failed %d times in run %r (last: %s); its values are missing there",
                          name, count, self.run, last)
        return {name: count for name, (count, _) in self._failures.items()}


def to_host(staged: Iterable[Any]) -> dict[int, np.ndarray]:
    """Host copies of staged partials: one transfer per accelerator, none for CPU tensors.

    A staged partial is a tensor, a numpy array (already on the host), or a tuple of 0-d
    tensors and floats read back as one vector.
    """
    host: dict[int, np.ndarray] = {}
    device_parts: dict[torch.device, list[torch.Tensor]] = {}
    pending: list[tuple[int, Any]] = []
    seen: set[int] = set()
    for value in staged:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            host[id(value)] = value
            continue
        parts = value if isinstance(value, tuple) else (value,)
        if all(not isinstance(p, torch.Tensor) or p.device.type == "cpu" for p in parts):
            host[id(value)] = _cpu_value(value)
            continue
        pending.append((id(value), value))
        for part in parts:
            if isinstance(part, torch.Tensor) and part.device.type != "cpu":
                device_parts.setdefault(part.device, []).append(part)
    if pending:
        fetched: dict[int, np.ndarray] = {}
        for group in device_parts.values():
            flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in group]).cpu().numpy()
            offset = 0
            for tensor in group:
                fetched[id(tensor)] = flat[offset : offset + tensor.numel()].reshape(tensor.shape)
                offset += tensor.numel()
        for key, value in pending:
            if isinstance(value, tuple):
                host[key] = np.array([_part_value(p, fetched) for p in value], dtype=np.float64)
            else:
                host[key] = fetched[id(value)]
    return host


def _cpu_value(value: Any) -> np.ndarray:
    if isinstance(value, tuple):
        return np.array([float(p) for p in value], dtype=np.float64)
    return value.detach().numpy().astype(np.float64, copy=False)


def _part_value(part: Any, fetched: dict[int, np.ndarray]) -> float:
    if isinstance(part, torch.Tensor):
        return float(fetched[id(part)]) if part.device.type != "cpu" else float(part)
    return float(part)
