"""The store sink: Records into the SQL store (``sonde.db`` by default)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sonde.background import charged
from sonde.errors import SondeError
from sonde.records import Record
from sonde.run_info import RunInfo
from sonde.sinks.base import HEARTBEAT_EVERY, Sink
from sonde.store import Store, open_store

__all__ = ["StoreSink"]

log = logging.getLogger("sonde")


class StoreSink(Sink):
    """Writes every Record to a :class:`~sonde.store.Store` (SQLite file, SQLite/PostgreSQL URL, or a Store).

    :meth:`open` runs on the caller's thread, so an unwritable path or a run name that is taken
    fails at ``probe()`` time with a :class:`~sonde.errors.StoreError`, not later in a thread.
    A Store passed in stays open after the run (its owner closes it); one opened here is closed.

    Small batches are coalesced into one transaction of up to ``batch_records`` records, held at
    most ``max_delay`` seconds: SQLite's cost is per commit (one index page per series touched),
    so per-step commits of a large model would halve the throughput.

    While the run is open, a daemon thread stamps its heartbeat every ``heartbeat`` seconds, so
    a run whose steps take minutes is not shown as ``stalled``, and one whose process was killed is.
    Batches and beats alike are submitted to the store's one writer thread (:mod:`sonde.store.writer`),
    which commits them in turn; each call returns once its write is committed, so :meth:`flush` and
    :meth:`close` mean "on disk".

    Args:
        store: file path, ``sqlite:``/``postgresql`` URL, or an open Store.
        batch_records: write to the store once this many records are waiting.
        max_delay: and at the latest this many seconds after the first of them arrived.
        heartbeat: seconds between heartbeats (default :data:`~sonde.sinks.base.HEARTBEAT_EVERY`).

    Example:
        >>> sink = StoreSink("runs/sonde.db")
        >>> sink.open(RunInfo("mlp"))        # doctest: +SKIP
        >>> sink.write([Record("mlp", 0, "train", "fc1", "weights", "norm", 1.5)])  # doctest: +SKIP
        >>> sink.close("finished")           # doctest: +SKIP
    """

    name = "store"

    def __init__(self, store: str | Path | Store = "sonde.db", *, batch_records: int = 10_000,
                 max_delay: float = 1.0, heartbeat: float | None = None) -> None:
        self.target = store
        self.batch_records = batch_records
        self.max_delay = max_delay
        self.heartbeat = HEARTBEAT_EVERY if heartbeat is None else heartbeat
        self._beating: tuple[threading.Event, threading.Thread] | None = None
        self.store: Store | None = None
        self.run: str | None = None
        self._buffer: list[Record] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._error: BaseException | None = None  # a failure on the timer thread, raised on the sink's thread

    def open(self, run: RunInfo) -> None:
        """Open the store and start (or resume) ``run``; sets ``run.first_step``."""
        self.store = self.target if isinstance(self.target, Store) else open_store(self.target)
        run.first_step = self.store.start_run(run, resume=run.resume)
        self.run = run.name
        stop = threading.Event()
        beater = threading.Thread(target=self._beat, args=(self.store, run.name, stop), name="sonde-heartbeat",
                                  daemon=True)
        self._beating = (stop, beater)
        beater.start()

    def write(self, records: Sequence[Record]) -> None:
        try:
            self._raise_pending()
            with self._lock:
                self._buffer.extend(records)
                if len(self._buffer) >= self.batch_records:
                    self._drain_locked()
                elif self._timer is None and self._buffer:
                    self._timer = threading.Timer(self.max_delay, self._drain_on_timer)
                    self._timer.daemon = True
                    self._timer.start()
        except BaseException:
            self._stop_beating()  # the runner disables a sink that raises: its run has no live writer now
            raise

    def graph(self, graph: dict[str, Any]) -> None:
        """Store the run's topology (``Store.put_graph``); the API and the dashboard serve it from there."""
        if self.store is None or self.run is None:
            raise RuntimeError("StoreSink.graph() before open()")
        self.store.put_graph(self.run, graph)

    def flush(self) -> None:
        """Write whatever is waiting, so that readers see it."""
        self._raise_pending()
        with self._lock:
            self._drain_locked()

    def close(self, status: str = "finished") -> None:
        """Write what is waiting, mark the run ``finished`` or ``failed``, release a store opened here."""
        if self.store is None or self.run is None:
            return
        self._stop_beating()  # no beat after the run's end
        try:
            self.flush()
            self.store.finish_run(self.run, status)
        finally:
            if not isinstance(self.target, Store):
                self.store.close()
            self.store = None

    def _drain_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        if self.store is None or self.run is None:
            raise RuntimeError("StoreSink.write() before open()")
        batch, self._buffer = self._buffer, []
        self.store.write(self.run, batch)

    def _stop_beating(self) -> None:
        if self._beating is not None:
            stop, beater = self._beating
            self._beating = None
            stop.set()
            if beater is not threading.current_thread():
                beater.join()

    def _beat(self, store: Store, run: str, stop: threading.Event) -> None:
        failed = False
        while not stop.wait(self.heartbeat) and self._error is None:
            try:
                store.heartbeat(run)
                failed = False
            except SondeError as exc:  # a busy or vanished database: say so once, keep trying
                if not failed:
                    log.warning("sonde: cannot stamp the heartbeat of run %r (%s); it may be shown as stalled", run,
                                exc)
                failed = True

    def _drain_on_timer(self) -> None:
        with self._lock, charged():  # counted by the overhead budget (sonde.background)
            self._timer = None
            try:
                self._drain_locked()
            except Exception as exc:  # noqa: BLE001 - handed to the sink's thread, which reports it
                self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
