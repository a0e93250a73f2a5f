"""The metric lifecycle, written once: the probe's bus and the server's evaluator both run it.

For each recorded step a :class:`MetricEngine` runs, on the instances its owner routes a
:class:`~sonde.metrics.base.Capture` to: ``prepare`` (shared work announced) → ``update`` (partials
staged on the tensor's device) → at the flush, every staged partial to the host in one batched
transfer per device (:func:`to_host`) → ``absorb`` → ``due?`` (``compute_every``; forced for an
evaluation pass, at an epoch's end for ``reset="epoch"``, and at the run's end) → ``compute``
(here, or on the background worker for ``offload`` metrics; under torch.distributed the due
states of every rank are merged first, by the :attr:`MetricEngine.merge_ranks` hook) → ``reset``
as ``reset=`` says → metrics of Records (``derived``) from the step's values → at an epoch's end the epoch reset and
:meth:`Metric.boundary`. :meth:`watch` hands every emitted batch to the watchers (``alerts``).

What differs between its two users stays with them: the bus routes captures by topic, layer and
schedule to clones of the configured metrics; the evaluator builds a metric per shipped spec and
flushes each shipped tensor at its own step. The engine never raises for a metric's failure: the
first is logged, later ones counted (:meth:`report_failures`).

Example:
    >>> import torch
    >>> from sonde.metrics import Mean
    >>> engine = MetricEngine("run")
    >>> mean = Mean()
    >>> engine.update(("fc", "activations"), [mean], Capture(torch.ones(3), layer="fc", topic="activations"))
    >>> [(r.layer, r.metric, r.value) for r in engine.flush("train", 0)]
    [('fc', 'mean', 1.0)]
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from sonde.metrics.base import Capture, Metric
from sonde.metrics.transfer import Copier, Transfer, default_copier
from sonde.records import Record

__all__ = ["MetricEngine", "to_host"]

log = logging.getLogger("sonde")

#: ``on_failure(metric, exc, layer, topic)``: how a metric's failure is reported instead of the default.
FailureHook = Callable[[Metric, Exception, str, str], None]
#: (layer, topic): where a metric's values go, within a phase.
Where = tuple[str, str]


#: ``offload(key, snapshot, phase, step, layer, topic)``: computes a snapshot of an ``offload`` metric
#: off this thread (the probe's background worker, :mod:`sonde.worker`); its Records follow from there.
Offload = Callable[[Hashable, Metric, str, int, str, str], None]
#: ``defer(finish)``: runs ``finish`` (the host part of a flush, returning its Records) on a
#: background thread, in submission order, and hands the Records on (the probe's worker); False
#: when it will not run (the worker's queue is full: that step's values are lost, loudly).
Defer = Callable[[Callable[[], list[Record]]], bool]

#: The metrics whose ``update`` keeps its host-side effects in declared state (and stages the
#: rest), so that their host part may run a step late on the background thread. A run whose
#: metrics are all among them reads its device partials back without host synchronisation.
DEFERRABLE = frozenset(
    f"sonde.metrics.{name}"
    for name in (
        "stats.TensorStats", "stats.Mean", "stats.Std", "stats.Var", "stats.Min", "stats.Max", "stats.AbsMean",
        "stats.Norm", "stats.ZeroFrac", "stats.NonfiniteFrac", "stats.Histogram", "stats.UpdateRatio",
        "training.Loss", "training.TrainAccuracy", "alerts.Alerts", "spectral.SpectralNorm",
        "spectral.ConditionNumber", "saturation.Saturation",
    )
)


class RankMerger(Protocol):
    """Merges the states of metric instances across the ranks of a distributed run, before compute
    (the probe's :class:`sonde.probe.distributed.RankMerge`)."""

    def merge(self, phase: str, step: int, final: bool, due: list[tuple[str, str, Metric]]) -> bool:
        """Replace the state of each ``(layer, topic, metric)`` about to compute by the merge of
        every rank's; False when nothing may be computed (the state is then dropped)."""

    def restore(self) -> None:
        """After computing: give back this rank's own state to instances that keep state across
        computes (``reset="epoch"`` or ``"never"``), so that the next merge counts it once."""


class MetricEngine:
    """The lifecycle of a run's metric instances: update, host transfer, compute, reset, boundaries.

    Args:
        run: the run the Records are filed under.
        metrics: the configured metrics (templates): each hears :meth:`Metric.boundary` once per
            epoch and at the run's end.
        watchers: the metrics that read every emitted batch (``watches``; default: those of ``metrics``).
        on_failure: reports a metric's failure (default: logged once, then counted).

    Attributes:
        instances: the live instances by a key their owner chooses (the epoch reset reaches them all).
        offload: computes ``offload`` metrics off the caller's thread when set (the probe's worker);
            without it they compute in :meth:`flush` like the others.
    """

    def __init__(self, run: str, metrics: Sequence[Metric] = (), *, watchers: Sequence[Metric] | None = None,
                 on_failure: FailureHook | None = None) -> None:
        self.run = run
        self.metrics = list(metrics)
        self.watchers = [m for m in self.metrics if m.watches] if watchers is None else list(watchers)
        self.instances: dict[Hashable, list[Metric]] = {}
        self.offload: Offload | None = None
        #: Runs the host part of a flush on a background thread (set by the bus when it has a
        #: worker); used when the staged partials live on CUDA (see :meth:`flush`).
        self.defer: Defer | None = None
        #: How each device's packed partials reach the host (:func:`sonde.metrics.transfer.default_copier`).
        self.copier: Copier = default_copier
        #: True once reading a step back failed on the background thread: monitoring is off.
        self.off = False
        self.on_failure = on_failure
        # Deferred flushes (decided at the first flush that stages something, for the whole run):
        # the training thread detaches each updated instance's staged partials and host state at
        # its flush; the background thread folds them into the instance's state kept in _base.
        # _lock guards an instance's state and staged list between the two threads.
        self._deferred: bool | None = None
        self._base: dict[int, dict[str, Any]] = {}
        self._inflight = 0
        self._lock = threading.Lock()
        #: Under torch.distributed: merges the due states of every rank before compute (set by the probe).
        self.merge_ranks: RankMerger | None = None
        # Per phase: instances updated since the last flush, and those holding state not computed yet.
        self._touched: dict[str, dict[Where, list[Metric]]] = {"train": {}, "eval": {}}
        self._dirty: dict[str, dict[Where, list[Metric]]] = {"train": {}, "eval": {}}
        self._epoch_end = False
        # Per failing metric: how often it failed and the last error (reported once, then counted at close).
        self._failures: dict[str, tuple[int, str]] = {}

    # -- the training thread's part -------------------------------------------------------------
    def update(self, where: Where, instances: Sequence[Metric], capture: Capture) -> None:
        """``prepare`` then ``update`` each instance with ``capture`` (staging partials); never raises."""
        if self.off:
            return
        with self._lock:
            self._update(where, instances, capture)

    def _update(self, where: Where, instances: Sequence[Metric], capture: Capture) -> None:
        for instance in instances:
            try:
                instance.prepare(capture)
            except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                self._report(instance, exc, *where)
        touched = self._touched.get(capture.phase)
        if touched is None:
            touched = self._touched[capture.phase] = {}
        for instance in instances:
            try:
                instance.update(capture)
            except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                self._report(instance, exc, *where)
                continue
            instance.updates += 1
            waiting = touched.get(where)
            if waiting is None:
                touched[where] = [instance]
            elif instance not in waiting:
                waiting.append(instance)

    def pending(self, phase: str) -> bool:
        """Whether something was updated in ``phase`` since the last flush."""
        return bool(self._touched.get(phase))

    def discard(self, phase: str) -> None:
        """Forget what was updated in ``phase`` since the last flush (a pass that broke off)."""
        with self._lock:
            for instances in self._touched.get(phase, {}).values():
                for metric in instances:
                    metric.reset()  # deferred: the live state holds only what was published since the flush
            self._touched[phase] = {}

    def accumulating(self) -> bool:
        """Whether some metric holds recorded state that has not been computed yet (or a flush
        is still on its way to the host)."""
        return self._inflight > 0 or any(self._dirty.values())

    def end_epoch(self) -> None:
        """The current train step is the last of an epoch: at its flush, metrics with
        ``reset="epoch"`` compute (whatever ``compute_every`` says) and then start afresh."""
        self._epoch_end = True

    # -- the flush ------------------------------------------------------------------------------
    def flush(self, phase: str, step: int, *, final: bool = False, epoch_end: bool | None = None,
              only: Collection[Metric] | None = None) -> list[Record]:
        """Fold in what ``phase`` staged since the last flush, compute the metrics due at ``step``
        (all of them when ``final``), and return the Records computed here (offloaded ones follow
        from the worker).

        ``epoch_end`` (default: whether :meth:`end_epoch` was called, for the train phase) forces
        ``reset="epoch"`` metrics to compute, then resets them. ``only`` limits computing and the
        epoch reset to those instances (the evaluator flushes one shipped series at its own step).
        """
        touched = self._touched.get(phase, {})
        self._touched[phase] = {}
        dirty = self._dirty.setdefault(phase, {})
        if epoch_end is None:
            epoch_end = self._epoch_end and phase == "train"
            if epoch_end:
                self._epoch_end = False
        if self.off:
            return []
        if not touched and not dirty and not epoch_end and not self._inflight:
            if self.merge_ranks is not None:  # the other ranks may hold state: meet them all the same
                self.merge_ranks.merge(phase, step, final, [])
            return []
        transfer = Transfer((value for instances in touched.values() for m in instances for _, value in m.staged),
                            self.copier)
        if self._deferred is None and (transfer.devices or any(m.staged for ms in touched.values() for m in ms)):
            self._deferred = bool(transfer.devices) and transfer.asynchronous and self._may_defer()
        if not self._deferred:
            transfer.start()
            return self._finish(phase, step, final, epoch_end, only, touched, transfer.wait(), {})
        # Deferred: detach what this step staged and added to host state, start the copy, return.
        detached: dict[int, tuple[list[tuple[str, Any]], dict[str, Any]]] = {}
        with self._lock:
            for instances in touched.values():
                for metric in instances:
                    detached[id(metric)] = (metric.staged, metric.state)
                    metric.staged = []
                    _fresh_state(metric)
            self._inflight += 1
        transfer.start()
        defer = self.defer
        assert defer is not None

        def finish() -> list[Record]:
            try:
                host = transfer.wait()
                return self._finish(phase, step, final, epoch_end, only, touched, host, detached)
            except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                self._reader_failed(exc)
                return []
            finally:
                with self._lock:
                    self._inflight -= 1

        if not defer(finish):
            with self._lock:
                self._inflight -= 1
        return []

    def _may_defer(self) -> bool:
        """Whether this run's flushes may finish on the background thread (see :data:`DEFERRABLE`);
        under torch.distributed the ranks merge on the training thread, so they stay synchronous."""
        return self.defer is not None and self.merge_ranks is None and all(
            f"{type(m).__module__}.{type(m).__qualname__}" in DEFERRABLE for m in self.metrics)

    def _reader_failed(self, exc: Exception) -> None:
        if not self.off:
            self.off = True
            log.error("sonde: reading a recorded step back from the device failed (%s: %s); training goes on, "
                      "and run %r records no more metrics", type(exc).__name__, exc, self.run, exc_info=exc)

    @contextlib.contextmanager
    def _held(self, metric: Metric) -> Iterator[None]:
        """Gives the block ``metric``'s recorded state: in deferred mode the state kept for it here,
        swapped in under the lock (the training thread's live state and staged partials are put
        back after); otherwise its own, as it is."""
        if not self._deferred:
            yield
            return
        with self._lock:
            live_state, live_staged = metric.state, metric.staged
            base = self._base.get(id(metric))
            if base is None:
                _fresh_state(metric)
            else:
                metric.state = base
            metric.staged = []
            try:
                yield
            finally:
                self._base[id(metric)] = metric.state
                metric.state, metric.staged = live_state, live_staged

    def _finish(self, phase: str, step: int, final: bool, epoch_end: bool, only: Collection[Metric] | None,
                touched: dict[Where, list[Metric]], host: dict[int, np.ndarray],
                detached: dict[int, tuple[list[tuple[str, Any]], dict[str, Any]]]) -> list[Record]:
        """The host part of a flush: absorb the host copies, compute what is due, reset, derive."""
        dirty = self._dirty.setdefault(phase, {})
        derived: list[tuple[str, str, Metric]] = []
        for key, instances in touched.items():
            for metric in instances:
                if metric.derived:
                    derived.append((*key, metric))
                    continue
                try:
                    with self._held(metric):
                        if id(metric) in detached:
                            staged, added = detached[id(metric)]
                            for name, value in added.items():
                                metric.absorb(name, value)
                            metric.staged = staged
                        metric.absorb_staged(host)
                except Exception as exc:  # noqa: BLE001
                    self._report(metric, exc, *key)
                    with self._held(metric):
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
        due: dict[Where, list[Metric]] = {}
        for key in order:
            kept: list[Metric] = []
            for metric in dirty[key]:
                forced = final or phase != "train" or (epoch_end and metric.reset_policy == "epoch")
                if (only is not None and metric not in only) or not (forced or metric.due(step)):
                    kept.append(metric)
                else:
                    due.setdefault(key, []).append(metric)
            if kept:
                dirty[key] = kept
            else:
                del dirty[key]
        if self.merge_ranks is not None and not self.merge_ranks.merge(
                phase, step, final, [(*key, metric) for key, metrics in due.items() for metric in metrics]):
            for metrics in due.values():  # the ranks could not merge: nothing is computed from this state
                for metric in metrics:
                    metric.reset()
            due = {}
        for key, metrics in due.items():
            layer, topic = key
            for metric in metrics:
                with self._held(metric):
                    computed = self._compute(metric, phase, step, layer, topic)
                    if metric.reset_policy == "compute":
                        metric.reset()
                for name, value in computed.items():
                    if name in read:
                        values[(layer, topic, name)] = value
                    records.append(Record(self.run, step, phase, layer, topic, name, value))
        if self.merge_ranks is not None:
            self.merge_ranks.restore()  # state kept across computes goes on from this rank's own
        for layer, topic, metric in derived:
            try:
                result = metric.derive(values, layer, topic)
            except Exception as exc:  # noqa: BLE001
                self._report(metric, exc, layer, topic)
                result = {}
            for name, value in result.items():
                values[(layer, topic, name)] = value
                records.append(Record(self.run, step, phase, layer, topic, name, value))
            with self._held(metric):
                metric.reset()
        if epoch_end:
            everything = [m for instances in list(self.instances.values()) for m in instances]
            for metric in everything if only is None else only:
                if metric.reset_policy == "epoch":
                    with self._held(metric):
                        metric.reset()
            self.boundary("epoch")
        return records

    def _compute(self, metric: Metric, phase: str, step: int, layer: str, topic: str) -> dict[str, Any]:
        """Compute here, or hand a snapshot to the worker (then nothing is returned here)."""
        if metric.offload and self.offload is not None:
            self.offload((phase, layer, topic, id(metric)), metric.snapshot(), phase, step, layer, topic)
            return {}
        try:
            return metric.compute()
        except Exception as exc:  # noqa: BLE001 - monitoring must never break training
            self._report(metric, exc, layer, topic)
            return {}

    def forget(self, keys: Iterable[Hashable]) -> None:
        """Drop the instances under ``keys`` (their run ended), with any state they still hold."""
        for key in keys:
            for metric in self.instances.pop(key, ()):
                self._base.pop(id(metric), None)
                for waiting in (*self._touched.values(), *self._dirty.values()):
                    for where, instances in list(waiting.items()):
                        if metric in instances:
                            instances.remove(metric)
                            if not instances:
                                del waiting[where]

    # -- boundaries, watchers, failures -----------------------------------------------------------
    def end_run(self) -> None:
        """After the last flush: tell the configured metrics the run ended (:meth:`Metric.boundary`);
        in deferred mode after the background thread has finished the last flush."""
        if self._deferred and self.defer is not None:
            def after_the_last_flush() -> list[Record]:
                self.boundary("run")
                return []

            if self.defer(after_the_last_flush):
                return
        self.boundary("run")

    def boundary(self, kind: str) -> None:
        """:meth:`Metric.boundary` once per configured metric (``"epoch"`` or ``"run"``)."""
        seen: set[int] = set()
        for metric in self.metrics:
            if id(metric) not in seen:
                seen.add(id(metric))
                try:
                    metric.boundary(kind)
                except Exception as exc:  # noqa: BLE001 - monitoring must never break training
                    self._report(metric, exc, "", "")

    def watch(self, records: list[Record]) -> list[Record]:
        """Records the watchers (alerts) add after reading ``records``; never raises."""
        extra: list[Record] = []
        for watcher in self.watchers:
            try:
                extra.extend(watcher.watch(records))
            except Exception as exc:  # noqa: BLE001
                self._report(watcher, exc, "", "")
        return extra

    def _report(self, metric: Metric, exc: Exception, layer: str, topic: str) -> None:
        """Log a metric's first failure; count the later ones for :meth:`report_failures`."""
        if self.on_failure is not None:
            self.on_failure(metric, exc, layer, topic)
            return
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
    """Host copies of staged partials, keyed by ``id`` of the staged value: one packed transfer per
    accelerator (:class:`~sonde.metrics.transfer.Transfer`), none for CPU tensors; waits for it.

    A staged partial is a tensor, a numpy array (already on the host), or a tuple of 0-d
    tensors and floats read back as one vector.
    """
    transfer = Transfer(staged)
    transfer.start()
    return transfer.wait()


def _fresh_state(metric: Metric) -> None:
    """Give ``metric`` a new state dict holding its declared defaults (its staged partials and
    update count are kept)."""
    staged, updates = metric.staged, metric.updates
    metric.state, metric.staged = {}, []
    metric.reset()
    metric.staged, metric.updates = staged, updates
