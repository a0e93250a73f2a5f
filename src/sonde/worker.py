"""The probe's background worker: heavy ``compute`` calls off the training thread.

A metric with ``offload = True`` (saturation's eigendecomposition, for one) hands a snapshot of
its host state to the worker at each step where it computes; the worker calls ``compute`` on
it and sends the Records on to the sinks. The training thread never waits for it:

* the queue holds at most ``max_backlog`` waiting tasks per (phase, layer, topic, metric), and
  at most ``max_backlog_bytes`` of their state (one waiting task is always allowed); one more
  for the same key means the worker is falling behind. sonde then says so loudly in the
  log and *coalesces*: the newest waiting snapshot, if its state resets at each compute, is
  merged into the new one (no batch is lost; the value spans both intervals and is filed at the
  later step); a cumulative snapshot (``reset="epoch"``/``"never"``) is superseded by the new
  one, which already contains it. Each waiting snapshot holds its metric's host state (a d×d
  float64 covariance for saturation), which is what bounds the backlog;
* a queue full of distinct keys (``max_pending``) skips the new task, loudly;
* a task that raises is logged once per metric and never reaches training; a metric that keeps
  failing is logged again at :meth:`Worker.close`, with how often and its last error.

:meth:`Worker.close` waits for the outstanding tasks (bounded by a timeout, loud when it runs
out), so ``Probe.close()`` loses nothing that was computed in time.

Example:
    >>> out = []
    >>> w = Worker(out.extend)
    >>> w.submit(("train", "fc", "activations", "peak"), ComputeTask(lambda: ["a record"]))
    True
    >>> w.close()
    True
    >>> out
    ['a record']
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from sonde.metrics.base import Metric
from sonde.records import Record

__all__ = ["ComputeTask", "MetricTask", "Worker"]

log = logging.getLogger("sonde")

try:
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover - optional
    _threadpool_limits = None


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS/LAPACK (OpenBLAS) limited to one thread while the worker computes, so that an
    eigendecomposition takes one core instead of spinning a second thread pool beside torch's.
    Uses threadpoolctl when installed (it comes with scikit-learn); the limit is process-wide for
    OpenBLAS while it lasts, and does not touch torch's own threads."""
    if _threadpool_limits is None:
        return contextlib.nullcontext()
    return _threadpool_limits(limits=1, user_api="blas")


class ComputeTask:
    """A unit of work for the worker: ``run()`` returns the Records to emit.

    Args:
        fn: the work; returns a list of Records.
        name: what the log calls it when it fails (a metric name).
    """

    def __init__(self, fn: Callable[[], list[Any]], name: str = "task") -> None:
        self.fn = fn
        self.name = name

    def run(self) -> list[Any]:
        return self.fn()

    @property
    def nbytes(self) -> int:
        """Host memory the task holds while it waits."""
        return 0

    def coalesce(self, older: ComputeTask) -> None:
        """Take over an older task of the same key that never ran (default: drop it)."""


class MetricTask(ComputeTask):
    """``compute()`` of a metric snapshot, turned into Records filed at ``step``.

    Example:
        ``MetricTask(metric.snapshot(), run="r", step=10, phase="train", layer="fc", topic="activations")``
    """

    def __init__(self, metric: Metric, *, run: str, step: int, phase: str, layer: str, topic: str) -> None:
        super().__init__(self._compute, metric.name)
        self.metric = metric
        self.where = (run, step, phase, layer, topic)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.metric.state.values() if isinstance(v, np.ndarray))

    def _compute(self) -> list[Any]:
        run, step, phase, layer, topic = self.where
        return [Record(run, step, phase, layer, topic, k, v) for k, v in self.metric.compute().items()]

    def coalesce(self, older: ComputeTask) -> None:
        # A resetting state covers only its own interval: fold the older interval in. A cumulative
        # state already contains everything the older snapshot had.
        if isinstance(older, MetricTask) and self.metric.reset_policy == "compute":
            self.metric.merge(older.metric)


class Worker:
    """One daemon thread computing queued tasks in submission order, never blocking the submitter.

    Args:
        emit: called on the worker thread with each task's Records (non-empty lists only).
        max_pending: tasks that may wait at once; beyond that new tasks are skipped.
        max_backlog: tasks of one key that may wait at once; beyond that they are coalesced.
        max_backlog_bytes: state bytes the waiting tasks of one key may hold (at least one waits).
    """

    def __init__(self, emit: Callable[[list[Any]], None], *, max_pending: int = 4096, max_backlog: int = 64,
                 max_backlog_bytes: int = 64 << 20, name: str = "sonde-worker") -> None:
        self.emit = emit
        self.max_pending = max_pending
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.coalesced = 0
        self.skipped = 0
        self.failed: dict[str, int] = {}  # failures per task name
        self._last_error: dict[str, str] = {}
        self._pending: OrderedDict[tuple[Hashable, int], ComputeTask] = OrderedDict()
        self._waiting: dict[Hashable, list[int]] = {}  # per key, the sequence numbers waiting
        self._seq = 0
        self._busy = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Tasks waiting or running."""
        with self._cond:
            return len(self._pending) + self._busy

    def submit(self, key: Hashable, task: ComputeTask) -> bool:
        """Queue ``task`` under ``key``; returns at once (see the module docstring for overload):
        False when the task was skipped (a full queue, or a closed worker)."""
        with self._cond:
            if self._stopping:
                return False
            waiting = self._waiting.setdefault(key, [])
            older = None
            if waiting and self._backlog_full(key, waiting, task):
                older = self._pending.pop((key, waiting.pop()))
            if older is not None:
                task.coalesce(older)
                self.coalesced += 1
                if self.coalesced == 1 or self.coalesced % 1000 == 0:
                    log.error(
                        "sonde: the background worker is falling behind (%d value(s) so far, e.g. %r of %s, were "
                        "merged into the next one instead of being computed on time); training is not slowed, but "
                        "compute less often (compute_every=...) or on fewer layers to get every value",
                        self.coalesced, task.name, key,
                    )
            elif len(self._pending) >= self.max_pending:
                if not waiting:
                    del self._waiting[key]
                self.skipped += 1
                if self.skipped == 1 or self.skipped % 1000 == 0:
                    log.error(
                        "sonde: the background worker's queue is full (%d tasks); skipped %d value(s) so far, "
                        "e.g. %r of %s; training is not slowed", self.max_pending, self.skipped, task.name, key,
                    )
                return False
            self._seq += 1
            waiting.append(self._seq)
            self._pending[(key, self._seq)] = task
            self._cond.notify_all()
            return True

    def _backlog_full(self, key: Hashable, waiting: list[int], task: ComputeTask) -> bool:
        if len(waiting) >= self.max_backlog:
            return True
        held = sum(self._pending[(key, seq)].nbytes for seq in waiting)
        return held + task.nbytes > self.max_backlog_bytes

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every task queued so far is done; False if ``timeout`` seconds ran out first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._busy) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 60.0) -> bool:
        """Finish the outstanding tasks (at most ``timeout`` seconds) and stop; True when all were done."""
        done = self.drain(timeout)
        with self._cond:
            lost = len(self._pending) + self._busy
            self._stopping = True
            self._pending.clear()
            self._waiting.clear()
            self._cond.notify_all()
        if not done:
            log.error(
                "sonde: the background worker did not finish within %.0f s; %d value(s) still being computed "
                "are lost (the rest of the run is recorded)", timeout, lost,
            )
        if self.coalesced or self.skipped:
            log.warning("sonde: the background worker merged %d and skipped %d value(s) because it fell behind",
                        self.coalesced, self.skipped)
        self._thread.join(1.0)
        for name, count in list(self.failed.items()):
            if count > 1:
                log.error("sonde: metric %r failed %d times on the background worker (last: %s); its values are "
                          "missing there", name, count, self._last_error[name])
        return done

    def _loop(self) -> None:
        _background_priority()
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                (key, seq), task = self._pending.popitem(last=False)
                waiting = self._waiting[key]
                waiting.remove(seq)
                if not waiting:
                    del self._waiting[key]  # keys used once (a deferred flush's) must not pile up
                self._busy = True
            try:
                self._run(task)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, task: ComputeTask) -> None:
        try:
            with _one_blas_thread():
                records: Sequence[Any] = task.run()
        except Exception as exc:  # noqa: BLE001 - a worker error must never reach training
            count = self.failed.get(task.name, 0)
            self.failed[task.name] = count + 1
            self._last_error[task.name] = f"{type(exc).__name__}: {exc}"
            if count == 0:
                log.error(
                    "sonde: metric %r failed on the background worker (%s: %s); training goes on, its values "
                    "are missing where it fails", task.name, type(exc).__name__, exc,
                )
            return
        if records:
            try:
                self.emit(list(records))
            except Exception as exc:  # noqa: BLE001
                log.error("sonde: could not hand the worker's records on (%s: %s)", type(exc).__name__, exc)


def _background_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: per-thread nice 19).

    On a machine whose cores training keeps busy, an eigendecomposition at normal priority
    halves the speed of every torch operation it overlaps (each parallel region waits for its
    slowest thread); at the lowest priority it runs in the gaps training leaves instead, and at
    full speed once training waits. Elsewhere this does nothing.
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
