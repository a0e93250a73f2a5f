"""Engines for the store: SQLite files in WAL mode, PostgreSQL through psycopg 3.

Example:
    >>> engine, where = engine_for("sqlite://")
    >>> where
    'sqlite://'
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from sonde.errors import StoreError

__all__ = ["engine_for", "paused_gc", "sqlite_engine"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a large batch is built.

    Building 50,000 row tuples (or decoding as many msgpack lists) triggers several full
    collections that walk every live object; they cost more than the work itself (5x for a decode).
    None of these objects form cycles, so nothing is lost by collecting after the batch instead.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sqlite_engine(url: str) -> Engine:
    """An SQLite engine: WAL, large page cache, writers take the lock at BEGIN (IMMEDIATE)."""
    memory = make_url(url).database in (None, "", ":memory:")
    # A pooled connection may be handed to another thread; the write lock serialises writers.
    # An in-memory database exists once per connection, so it must be a single shared one.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30.0},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Turn off the driver's own implicit BEGIN so that ours (below) covers DDL too:
        # a migration is then all-or-nothing.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        # Each commit rewrites one index leaf per series it touches; a 64 MiB page cache and a
        # 40 MiB WAL between checkpoints (default 4 MiB) more than double the records/s of
        # one-step batches, because a page modified by many commits is checkpointed once.
        cursor.execute("PRAGMA cache_size=-65536")
        cursor.execute("PRAGMA wal_autocheckpoint=10000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock at BEGIN, so a read-then-write transaction waits for
        # another writer (busy timeout) instead of failing when it tries to upgrade.
        mode = "IMMEDIATE" if conn.get_execution_options().get("sonde_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def engine_for(path_or_url: str | Path) -> tuple[Engine, str]:
    """The engine for a path or URL, and how to name the store in messages (no password).

    A plain ``postgresql://`` URL is given psycopg 3, the driver sonde depends on.
    """
    text = str(path_or_url)
    if text.startswith("sqlite:"):
        return sqlite_engine(text), text
    if text.startswith("postgresql"):
        url = make_url(text)
        if url.drivername == "postgresql":  # psycopg 3 is the driver sonde ships with, not psycopg2
            url = url.set(drivername="postgresql+psycopg")
        return create_engine(url, pool_pre_ping=True), url.render_as_string(hide_password=True)
    if "://" in text:
        raise StoreError(
            f"unsupported store URL '{text}'; use a file path ('sonde.db'), 'sqlite:///path.db' "
            "or 'postgresql+psycopg://user@host/db'"
        )
    path = Path(text).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory for the sonde store '{path}' ({exc.strerror or exc}); "
            "pass store= a path in a writable directory"
        ) from exc
    return sqlite_engine(f"sqlite:///{path}"), str(path)
