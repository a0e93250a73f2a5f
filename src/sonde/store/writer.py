"""The store's one writer: a thread that owns the write connection and runs every write in turn.

Datasette's model: a write is a function of the connection, submitted to the writer's queue; the
writer runs it in one transaction and hands its result, or its exception, back through a
:class:`~concurrent.futures.Future`, so the caller waits where it needs the outcome and gets the
error itself. Whoever writes (the sink thread, the store sink's heartbeat, the API's thread pool,
the evaluator's workers) never touches the write connection; two writes never interleave, so no
lock is needed around them. Readers use connections of their own (SQLite in WAL mode lets them read
while the writer writes), except for an in-memory database: that is one connection, so its reads
are run by the writer too.

The thread starts on the first write (a store that is only read never starts one) and stops in
:meth:`Writer.close` after the writes already queued; a later write starts it again.

Example:
    >>> from sqlalchemy import text
    >>> from sonde.store.engine import engine_for
    >>> writer = Writer(engine_for("sqlite://")[0])
    >>> writer.call(lambda conn: conn.execute(text("SELECT 1 + 1")).scalar())
    2
    >>> writer.close()
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from sonde.background import charged

__all__ = ["Writer"]

log = logging.getLogger("sonde")

_T = TypeVar("_T")
_Job = tuple[Callable[[Connection], Any], "Future[Any]"]


class Writer:
    """One daemon thread that owns ``engine``'s write connection and runs submitted writes in order.

    Each write runs in its own transaction, begun with ``sonde_write`` set (an SQLite ``BEGIN
    IMMEDIATE``): it commits when the function returns and rolls back when it raises.

    Example:
        >>> future = writer.submit(lambda conn: conn.execute(runs.delete()))   # doctest: +SKIP
        >>> future.result()                                                    # doctest: +SKIP
    """

    def __init__(self, engine: Engine, name: str = "sonde-store-writer") -> None:
        self.engine = engine
        self.name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()  # guards the thread's start and stop, never a write

    @property
    def ident(self) -> int | None:
        """The writer thread's id while it runs, None before its first write and after :meth:`close`."""
        thread = self._thread
        return thread.ident if thread is not None and thread.is_alive() else None

    def submit(self, fn: Callable[[Connection], _T]) -> Future[_T]:
        """Queue ``fn(conn)`` to run in a write transaction; the future holds its result or its exception."""
        if threading.get_ident() == self.ident:
            # The writer waiting on its own queue would wait forever.
            raise RuntimeError("a store write was submitted from the store's writer thread itself")
        future: Future[_T] = Future()
        with self._starting:
            if self._thread is None or not self._thread.is_alive():  # first write, after close, or in a fork
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._loop, args=(self._queue,), name=self.name, daemon=True)
                self._thread.start()
            self._queue.put((fn, future))
        return future

    def call(self, fn: Callable[[Connection], _T]) -> _T:
        """Run ``fn(conn)`` on the writer and wait for it: its result, or its exception raised here."""
        return self.submit(fn).result()

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread once the writes queued so far are done (all committed or failed), and release
        the write connection. A write submitted afterwards starts the writer again."""
        with self._starting:
            thread, self._thread = self._thread, None
            if thread is not None and thread.is_alive():
                self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _usable(self, conn: Connection | None) -> Connection:
        """The write connection, opened anew when there is none or it broke.

        Held across writes, it is pinged before each one where the engine pings pooled connections
        on checkout (PostgreSQL), so a restarted database costs no failed write, as it did not before.
        """
        if conn is not None and not conn.closed and not conn.invalidated:
            if not self.engine.pool._pre_ping:  # type: ignore[attr-defined]  # the engine's own setting
                return conn
            try:
                dbapi = conn.connection.dbapi_connection
                if dbapi is not None and self.engine.dialect.do_ping(dbapi):
                    return conn
            except Exception as exc:  # noqa: BLE001 - a dead connection is replaced below
                log.debug("sonde: the store's write connection is gone (%s); reconnecting", exc)
            conn.invalidate()
        if conn is not None:
            conn.close()
        return self.engine.connect().execution_options(sonde_write=True)

    def _loop(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        conn: Connection | None = None
        try:
            while (job := jobs.get()) is not None:
                fn, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    conn = self._usable(conn)
                    # charged around the commit too: writing it is part of the job's CPU time
                    with charged(), conn.begin():  # counted by a probe's overhead budget (sonde.background)
                        result = fn(conn)
                except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del job, fn, future  # a finished write keeps nothing of its caller alive
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception as exc:  # noqa: BLE001 - closing a broken connection must not hide anything
                    log.debug("sonde: closing the store's write connection failed: %s", exc)
