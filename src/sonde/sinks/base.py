"""The Sink interface and the thread that feeds each sink off the training thread.

A sink receives lists of Records. Every sink runs on its own daemon thread fed by a bounded
queue, so a slow or broken sink never stalls training nor the other sinks: a sink that
raises is reported once, loudly, and disabled; the others keep everything.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from sonde.background import charged
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo  # re-exported: sinks are written against them

__all__ = ["HEARTBEAT_EVERY", "LayerInfo", "RunInfo", "Sink", "SinkRunner"]

log = logging.getLogger("sonde")

#: Seconds between the heartbeats a writing sink (store, remote) gives its open run, even while
#: training writes nothing; readers show a run silent for ``sonde.store.status.STALL_AFTER`` as stalled.
HEARTBEAT_EVERY = 5.0


class Sink:
    """Base class of sinks. Subclasses override :meth:`write` and usually :meth:`open`/:meth:`close`.

    ``open`` runs on the caller's thread (so that a bad path fails at ``probe()``);
    ``write`` and ``close`` run on the sink's own thread.

    Example:
        >>> class Collect(Sink):
        ...     def __init__(self):
        ...         self.records = []
        ...     def write(self, records):
        ...         self.records.extend(records)
    """

    name = "sink"
    #: Whether the sink shows each alert to the user itself (the console sink prints it): the probe
    #: then does not log alerts too, so each alert is seen once.
    shows_alerts = False

    def open(self, run: RunInfo) -> None:
        """Prepare for a run; raise here for anything that makes the sink unusable."""

    def write(self, records: Sequence[Record]) -> None:
        raise NotImplementedError

    def graph(self, graph: dict[str, Any]) -> None:
        """Receive the model's topology (:meth:`sonde.Graph.to_dict`), once per run; default: ignore it.

        Called on the sink's own thread, when the probe has built the graph (after the first step).
        """

    def flush(self) -> None:
        """Make everything written so far durable/visible."""

    def close(self, status: str = "finished") -> None:
        """Finish the run; ``status`` is ``finished`` or ``failed``."""


_STOP = object()
_FLUSH = object()
_GRAPH = object()


class SinkRunner:
    """Feeds one sink from a bounded queue on a daemon thread."""

    def __init__(self, sink: Sink, max_batches: int = 10_000) -> None:
        self.sink = sink
        self.failed: BaseException | None = None
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_batches)
        self._flushed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sonde-sink-{sink.name}", daemon=True)
        self._thread.start()

    def submit(self, records: list[Record]) -> None:
        """Queue records; never blocks: a full queue drops the batch and warns once."""
        if self.failed is not None:
            return
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            if self.dropped == 0:
                log.error("sonde: sink %r cannot keep up; dropping records for it (training goes on)", self.sink.name)
            self.dropped += len(records)

    def submit_graph(self, graph: dict[str, Any]) -> None:
        """Queue the run's graph for :meth:`Sink.graph`; never blocks (a full queue drops it, loudly)."""
        if self.failed is not None:
            return
        try:
            self._queue.put_nowait((_GRAPH, graph))
        except queue.Full:
            log.error("sonde: sink %r cannot keep up; the model graph is not recorded by it", self.sink.name)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far has been written."""
        if self.failed is not None or not self._thread.is_alive():
            return
        self._flushed.clear()
        self._queue.put(_FLUSH)
        self._flushed.wait(timeout)

    def close(self, status: str = "finished", timeout: float = 60.0) -> None:
        if self._thread.is_alive():
            self._queue.put((_STOP, status))
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("sonde: sink %r did not finish within %.0f s", self.sink.name, timeout)

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        log.error(
            "sonde: sink %r failed and is disabled for the rest of the run (training goes on, other sinks "
            "keep recording): %s: %s",
            self.sink.name, type(exc).__name__, exc,
        )

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _FLUSH:
                if self.failed is None:
                    try:
                        self.sink.flush()
                    except Exception as exc:  # noqa: BLE001 - a sink must never take training down
                        self._fail(exc)
                self._flushed.set()
                continue
            if isinstance(item, tuple) and item and item[0] is _STOP:
                if self.failed is None:
                    try:
                        self.sink.close(item[1])
                    except Exception as exc:  # noqa: BLE001
                        self._fail(exc)
                return
            if self.failed is not None:
                continue
            if isinstance(item, tuple) and item and item[0] is _GRAPH:
                try:
                    self.sink.graph(item[1])
                except Exception as exc:  # noqa: BLE001 - a graph the sink cannot keep costs only the graph
                    log.error("sonde: sink %r could not record the model graph: %s: %s",
                              self.sink.name, type(exc).__name__, exc)
                continue
            try:
                with charged():  # counted by the overhead budget (sonde.background)
                    self.sink.write(item)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
