"""Engines for the store: SQLite files in WAL mode, PostgreSQL through psycopg 3.

An SQLite file that cannot be written (a read-only mount, a directory or file without write
permission) is opened read-only: ``mode=ro``, and ``immutable=1`` when its directory cannot be
written either, since a WAL reader would otherwise need to create the ``-shm`` file there.
:func:`is_read_only` tells such an engine apart; the store refuses to write through it.

Example:
    >>> engine, where = engine_for("sqlite://")
    >>> where
    'sqlite://'
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from sonde.errors import StoreError
from sonde.extras import require

__all__ = ["engine_for", "is_read_only", "paused_gc", "sqlite_engine"]

log = logging.getLogger("sonde")


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


def is_read_only(engine: Engine) -> bool:
    """Whether ``engine`` opens its SQLite file read-only (``mode=ro``), as :func:`engine_for` does for
    a file that cannot be written.

    Example:
        >>> is_read_only(engine_for("sqlite://")[0])
        False
    """
    return engine.dialect.name == "sqlite" and engine.url.query.get("mode") == "ro"


def _read_only_url(path: Path) -> URL | None:
    """The read-only URL of an existing SQLite file this process cannot write, None when it can write it.

    Writing needs the file and, for the ``-wal`` and ``-shm`` files beside it, the directory (unless
    both already exist writable). ``os.access`` sees read-only mounts and immutable files for root too.
    """
    if not path.is_file():
        return None
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    directory_writable = os.access(path.parent, os.W_OK)
    side_files_writable = all(os.access(p, os.W_OK) for p in (wal, shm))
    if os.access(path, os.W_OK) and (directory_writable or side_files_writable):
        return None
    query = {"mode": "ro", "uri": "true"}
    if not directory_writable:
        unflushed = wal.is_file() and wal.stat().st_size > 0
        if unflushed and shm.is_file() and os.access(shm, os.R_OK):
            pass  # a reader can use the existing -wal and -shm: it sees the unflushed transactions too
        else:
            # Nothing can be created beside the file: read it as it is, without locks or a -shm.
            query["immutable"] = "1"
            if unflushed:
                log.warning("sonde: %s is read-only and its write-ahead log %s has no -shm file beside it; "
                            "reading the database without the log (its latest transactions are not shown)",
                            path, wal)
    return URL.create("sqlite", database="file:" + quote(str(path.resolve())), query=query)


def sqlite_engine(url: str | URL) -> Engine:
    """An SQLite engine: WAL, large page cache, writers take the lock at BEGIN (IMMEDIATE).

    A ``file:`` URI with ``mode=ro`` (and ``uri=true``) opens the file read-only: no journal mode
    is set on it, and the store refuses writes through it (see :func:`is_read_only`).
    """
    parsed = make_url(url)
    memory = parsed.database in (None, "", ":memory:")
    read_only = parsed.query.get("mode") == "ro"
    # A pooled connection may be handed to another thread; the store's one writer thread serialises writes.
    # An in-memory database exists once per connection, so it must be a single shared one.
    engine = create_engine(
        parsed,
        connect_args={"check_same_thread": False, "timeout": 30.0},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Turn off the driver's own implicit BEGIN so that ours (below) covers DDL too:
        # a migration is then all-or-nothing.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA cache_size=-65536")
        if not read_only:  # setting the journal mode writes the file's header
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
            # Each commit rewrites one index leaf per series it touches; a 64 MiB page cache and a
            # 40 MiB WAL between checkpoints (default 4 MiB) more than double the records/s of
            # one-step batches, because a page modified by many commits is checkpointed once.
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

    A plain ``postgresql://`` URL is given psycopg 3, the driver sonde depends on. An existing
    SQLite file (a path or a ``sqlite:///`` URL) that cannot be written is opened read-only.
    """
    text = str(path_or_url)
    if text.startswith("sqlite:"):
        database = make_url(text).database
        if database and database != ":memory:" and not database.startswith("file:"):
            return sqlite_engine(_read_only_url(Path(database)) or text), text
        return sqlite_engine(text), text
    if text.startswith("postgresql"):
        url = make_url(text)
        if url.drivername == "postgresql":  # psycopg 3 is the driver of the 'postgres' extra, not psycopg2
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername == "postgresql+psycopg":
            require("psycopg", "postgres", "a PostgreSQL store")
        return create_engine(url, pool_pre_ping=True), url.render_as_string(hide_password=True)
    if "://" in text:
        raise StoreError(
            f"unsupported store URL '{text}'; use a file path ('sonde.db'), 'sqlite:///path.db' "
            "or 'postgresql+psycopg://user@host/db'"
        )
    path = Path(text).expanduser()
    read_only = _read_only_url(path)
    if read_only is not None:
        return sqlite_engine(read_only), str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory for the sonde store '{path}' ({exc.strerror or exc}); "
            "pass store= a path in a writable directory"
        ) from exc
    return sqlite_engine(f"sqlite:///{path}"), str(path)
