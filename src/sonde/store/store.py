"""The SQL store: runs, their layers and their Records, over SQLite (default) or PostgreSQL.

One :class:`Store` wraps one SQLAlchemy engine and one writer thread (:mod:`sonde.store.writer`):
every write (a run started, a batch of Records, a heartbeat, a graph, a run finished or deleted)
is a function handed to that thread, which runs it in one transaction on the write connection it
alone owns, while the caller waits for the outcome; an error reaches the caller as it was raised.
Reads take their own pooled connection, so a dashboard or a notebook can read while training
writes (SQLite runs in WAL mode for exactly that). The readers are in :mod:`sonde.store.reads`
and :mod:`sonde.store.views`, the batch inserts in :mod:`sonde.store.inserts`.

Example:
    >>> store = open_store("sonde.db")                      # doctest: +SKIP
    >>> store.load("mlp-digits", topics=["weights"])        # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from sonde.errors import ConfigError, RunExistsError, StoreError
from sonde.records import Record
from sonde.run_config import check_config
from sonde.run_info import RunInfo
from sonde.store.engine import engine_for, is_read_only
from sonde.store.inserts import RecordInserter
from sonde.store.reads import StoreReads
from sonde.store.schema import (
    SCHEMA_VERSION,
    batches,
    graphs,
    layers,
    messages,
    migrate,
    readable_version,
    records,
    runs,
    series,
)
from sonde.store.status import stall_after_default
from sonde.store.views import StoreViews
from sonde.store.writer import Writer

__all__ = ["Store", "open_store"]

_STATUSES = ("running", "finished", "failed")
_T = TypeVar("_T")
_STEP = attrgetter("step")


def open_store(path_or_url: str | Path = "sonde.db", *, create: bool = True,
               stall_after: float | None = None) -> Store:
    """Open (and create or migrate) a store from a file path or a database URL.

    A plain path becomes an SQLite file in WAL mode, its directories created as needed;
    a URL starting with ``sqlite:`` or ``postgresql`` (``postgresql+psycopg://...``) is used as is.
    An existing SQLite file that cannot be written (read-only mount, no write permission on it or
    on its directory) is opened read-only: everything can be read, and writing raises a
    :class:`~sonde.errors.StoreError` that says the store is read-only.

    Args:
        path_or_url: file path or SQLAlchemy URL.
        create: when False, a missing SQLite file is an error instead of a new store.
        stall_after: seconds without a heartbeat after which a running run is shown as ``stalled``
            (default :data:`sonde.store.status.STALL_AFTER`, or ``$SONDE_STALL_AFTER``).

    Raises:
        StoreError: the store cannot be opened or created; the message names it and says what to do.

    Example:
        >>> store = open_store(tmp_path / "runs" / "sonde.db")   # doctest: +SKIP
        >>> store.runs().empty                                   # doctest: +SKIP
        True
    """
    text = str(path_or_url)
    if not create and "://" not in text and not Path(text).expanduser().is_file():
        raise StoreError(f"no sonde store at '{text}'; record a run first with sonde.probe(...)")
    try:
        engine, where = engine_for(path_or_url)
    except (StoreError, ConfigError):  # ConfigError: the driver's extra is not installed
        raise
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open the sonde store '{text}': {exc}; check the URL and its driver") from exc
    read_only = is_read_only(engine)
    try:
        version = readable_version(engine) if read_only else migrate(engine)
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        engine.dispose()
        detail = getattr(exc, "orig", None) or exc
        hint = "" if read_only else "; pass store= a writable file path or a reachable database URL"
        raise StoreError(f"cannot open the {'read-only ' * read_only}sonde store '{where}': {detail}{hint}") from exc
    return Store(engine, where, stall_after=stall_after, version=version)


class Store(StoreReads, StoreViews):
    """Runs, layers and Records in one SQL database. Build it with :func:`open_store`.

    Example:
        >>> store = open_store("sonde.db")                                   # doctest: +SKIP
        >>> first = store.start_run(RunInfo("mlp"), resume=False)            # doctest: +SKIP
        >>> store.write("mlp", [Record("mlp", first, "train", "fc1", "weights", "norm", 1.5)])  # doctest: +SKIP
        >>> store.finish_run("mlp", "finished")                              # doctest: +SKIP
    """

    def __init__(self, engine: Engine, where: str, *, stall_after: float | None = None,
                 version: int = SCHEMA_VERSION) -> None:
        self.engine = engine
        self.where = where
        #: opened read-only (a file that cannot be written); every write raises StoreError
        self.read_only = is_read_only(engine)
        #: seconds without a heartbeat after which a running run is shown as ``stalled``
        self.stall_after = stall_after_default() if stall_after is None else float(stall_after)
        # A read-only store may predate the heartbeat column (version 5): its last update stands in.
        self._heartbeat = runs.c.heartbeat_at if version >= 5 else runs.c.updated_at
        #: the one thread that writes to this store (started by the first write)
        self.writer = Writer(engine, name=f"sonde-store-writer:{Path(where).name or where}")
        # A Store dropped without close() stops its writer too (the thread holds no reference to the Store).
        weakref.finalize(self, self.writer.close, 0)
        self._run_ids: dict[str, int] = {}  # run name -> id, as committed
        self._inserter = RecordInserter(engine, where)
        # One shared in-memory connection cannot serve a reader beside the writer: the writer reads too.
        self._reads_on_writer = isinstance(engine.pool, StaticPool)

    def __repr__(self) -> str:
        return f"Store({self.where!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------

    def _write(self, fn: Callable[[Connection], _T]) -> _T:
        """Run ``fn(conn)`` in one write transaction on the writer thread and wait for it.

        Raises:
            StoreError: the store is read-only (nothing is submitted).
            Exception: whatever ``fn`` (or its commit) raised, as it was raised.
        """
        if self.read_only:
            raise StoreError(
                f"the sonde store '{self.where}' is read-only (the file or its directory cannot be written), so "
                "nothing can be recorded, finished or deleted in it; copy it somewhere writable to change it"
            )
        return self.writer.call(fn)

    def unique_run_name(self, base: str) -> str:
        """``base`` when no run has that name, else the first free ``base-2``, ``base-3``, ...

        Example:
            >>> store.unique_run_name("mlp")   # doctest: +SKIP
            'mlp-2'
        """
        return self._read(lambda conn: self._unique_run_name(conn, base))

    @staticmethod
    def _unique_run_name(conn: Connection, base: str) -> str:
        query = select(runs.c.name).where(runs.c.name.startswith(base, autoescape=True))
        taken = set(conn.execute(query).scalars())
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def start_run(self, info: RunInfo, resume: bool = False) -> int:
        """Create (or, with ``resume``, reopen) the run and its layers; returns the first step to record.

        Raises:
            RunExistsError: the name is taken and ``resume`` is False.
            ConfigError: ``info.config`` is deeper or larger than :mod:`sonde.run_config` allows.
        """
        check_config(info.config)

        def start(conn: Connection) -> tuple[int, int]:
            now = time.time()
            row = conn.execute(select(runs.c.id, runs.c.last_step).where(runs.c.name == info.name)).first()
            if row is None:
                run_id = conn.execute(
                    runs.insert().values(
                        name=info.name, model=info.model, framework=info.framework,
                        config=json.dumps(info.config, default=str, sort_keys=True),
                        status="running", started_at=now, updated_at=now, heartbeat_at=now,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]  # always set after an INSERT
                first_step = 0
            elif not resume:
                own = select(series.c.id).where(series.c.run_id == row.id)
                count = conn.execute(select(func.count()).where(records.c.series_id.in_(own))).scalar()
                last = "none" if row.last_step is None else row.last_step
                raise RunExistsError(
                    f"run '{info.name}' already exists in {self.where} ({count} records, last step {last}); "
                    f"pass resume=True to append to it, or choose another run name such as "
                    f"'{self._unique_run_name(conn, info.name)}'"
                )
            else:
                run_id = row.id
                conn.execute(
                    runs.update().where(runs.c.id == run_id).values(status="running", updated_at=now,
                                                                    heartbeat_at=now, ended_at=None)
                )
                first_step = 0 if row.last_step is None else row.last_step + 1
            self._upsert_layers(conn, run_id, info)
            return int(run_id), first_step

        try:
            run_id, first_step = self._write(start)
        except IntegrityError as exc:  # another process created the same name between our SELECT and INSERT
            raise RunExistsError(
                f"run '{info.name}' was just created in {self.where} by another writer; pass resume=True "
                f"or choose another run name such as '{self.unique_run_name(info.name)}'"
            ) from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot start run '{info.name}' in {self.where}: {exc}") from exc
        self._run_ids[info.name] = run_id
        return first_step

    def _upsert_layers(self, conn: Connection, run_id: int, info: RunInfo) -> None:
        # SELECT-then-INSERT/UPDATE instead of a dialect's ON CONFLICT: portable, and the
        # transaction's write lock makes it race-free.
        existing = set(conn.execute(select(layers.c.name).where(layers.c.run_id == run_id)).scalars())
        new: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []
        for position, layer in enumerate(info.layers):
            row = {"position": position, "type": layer.type, "param_shapes": json.dumps(layer.param_shapes)}
            (old if layer.name in existing else new).append({**row, "name": layer.name})
        if new:
            conn.execute(layers.insert().values(run_id=run_id), new)
        for row in old:
            conn.execute(
                layers.update().where(layers.c.run_id == run_id, layers.c.name == row.pop("name")).values(**row)
            )

    def _run_id(self, conn: Connection, run: str) -> int:
        run_id = self._run_ids.get(run)
        if run_id is None:
            run_id = conn.execute(select(runs.c.id).where(runs.c.name == run)).scalar()
            if run_id is None:
                raise ConfigError(f"no run '{run}' in {self.where}; runs there: {self._names(conn) or 'none'}")
            self._run_ids[run] = run_id
        return run_id

    @staticmethod
    def _names(conn: Connection) -> str:
        return ", ".join(repr(n) for n in conn.execute(select(runs.c.name).order_by(runs.c.name)).scalars())

    def write(self, run: str, batch: Sequence[Record]) -> None:
        """Append Records to ``run`` in one transaction: all of the batch is stored, or none of it.

        Scalars go to the ``value`` column, arrays to ``array`` as float64 bytes (flattened).

        Raises:
            StoreError: the batch could not be stored; nothing of it was.
        """
        self._store(run, batch, None)

    def write_batch(self, run: str, batch_id: str, batch: Sequence[Record]) -> bool:
        """Append Records like :meth:`write`, once per ``batch_id``: a replayed batch stores nothing.

        The batch id is written in the same transaction as the Records, so a client that retries
        after a timeout (not knowing whether its batch arrived) can never store it twice.

        Returns:
            True when the batch was stored, False when ``batch_id`` had already been stored for ``run``.

        Raises:
            ConfigError: no run has that name, or ``batch_id`` is empty.
            StoreError: the batch could not be stored; nothing of it was.

        Example:
            >>> [store.write_batch("mlp", "3f2a...", records) for _ in range(2)]   # doctest: +SKIP
            [True, False]
        """
        if not isinstance(batch_id, str) or not batch_id:
            raise ConfigError(f"batch_id must be a non-empty string; got {batch_id!r}")
        return self._store(run, batch, batch_id)


    def _store(self, run: str, batch: Sequence[Record], batch_id: str | None) -> bool:
        if not batch and batch_id is None:
            return True
        run_id = self._run_ids.get(run) or self._read(lambda conn: self._run_id(conn, run))
        try:
            last: int | None = max(map(_STEP, batch)) if batch else None
        except TypeError:  # a step that is not a number; the insert names the Record below
            last = None

        def store(conn: Connection) -> bool:
            if batch_id is not None:
                seen = select(batches.c.batch_id).where(batches.c.run_id == run_id, batches.c.batch_id == batch_id)
                if conn.execute(seen).first() is not None:
                    return False
                # Under PostgreSQL a concurrent writer (another process) of the same batch blocks here
                # on the primary key until the first commits, then fails: caught below as a duplicate.
                conn.execute(batches.insert().values(run_id=run_id, batch_id=batch_id, received_at=time.time()))
            if batch:
                self._inserter.insert_batch(conn, run_id, batch, last if isinstance(last, int) else None)
            return True

        try:
            return self._write(store)
        except IntegrityError as exc:
            if batch_id is not None and self._batch_seen(run_id, batch_id):
                return False  # a concurrent writer stored the same batch first
            raise StoreError(f"cannot write {len(batch)} records of run '{run}' to {self.where}: {exc}") from exc
        except SQLAlchemyError as exc:
            self._inserter.forget(run_id)  # new catalog rows may have been rolled back with the batch
            raise StoreError(f"cannot write {len(batch)} records of run '{run}' to {self.where}: {exc}") from exc
        except StoreError:
            self._inserter.forget(run_id)
            raise

    def _batch_seen(self, run_id: int, batch_id: str) -> bool:
        query = select(batches.c.batch_id).where(batches.c.run_id == run_id, batches.c.batch_id == batch_id)
        return self._read(lambda conn: conn.execute(query).first() is not None)

    def finish_run(self, run: str, status: str = "finished") -> None:
        """Mark ``run`` as ``finished`` or ``failed`` (or back to ``running``) and stamp its end."""
        if status not in _STATUSES:
            raise ConfigError(f"run status must be one of {', '.join(_STATUSES)}; got {status!r}")

        def finish(conn: Connection) -> None:
            now = time.time()
            ended = None if status == "running" else now
            update = runs.update().where(runs.c.id == self._run_id(conn, run))
            conn.execute(update.values(status=status, updated_at=now, heartbeat_at=now, ended_at=ended))

        try:
            self._write(finish)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot finish run '{run}' in {self.where}: {exc}") from exc

    def heartbeat(self, run: str) -> None:
        """Stamp ``run``'s heartbeat: its writer is alive, even if it has written nothing for a while.

        The store sink calls this every few seconds while a run is open, the server when a remote
        probe beats (every write stamps it too); readers show a ``running`` run whose heartbeat is
        older than :attr:`stall_after` as ``stalled`` (see :mod:`sonde.store.status`).

        Raises:
            ConfigError: no run has that name.
            StoreError: the store is read-only or the stamp could not be written.

        Example:
            >>> store.heartbeat("mlp")   # doctest: +SKIP
        """
        def beat(conn: Connection) -> None:
            conn.execute(runs.update().where(runs.c.id == self._run_id(conn, run)).values(heartbeat_at=time.time()))

        try:
            self._write(beat)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot stamp the heartbeat of run '{run}' in {self.where}: {exc}") from exc

    # -- reading --------------------------------------------------------------------------

    def _read(self, fn: Callable[[Connection], _T]) -> _T:
        """Run ``fn(conn)`` in one read transaction (one consistent snapshot) on a reader's connection."""
        try:
            if self._reads_on_writer:
                return self.writer.call(fn)
            with self.engine.connect() as conn, conn.begin():
                return fn(conn)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read {self.where}: {exc}") from exc

    # -- runs ---------------------------------------------------------------------------------

    def delete_run(self, run: str) -> None:
        """Delete ``run`` with its layers, Records, graph, series catalog and batch ids.

        Raises:
            ConfigError: no run has that name.

        Example:
            >>> store.delete_run("mlp-2")   # doctest: +SKIP
        """
        def delete(conn: Connection) -> None:
            run_id = self._run_id(conn, run)
            # Children first and explicitly: SQLite enforces no foreign keys unless asked to.
            own = select(series.c.id).where(series.c.run_id == run_id)
            conn.execute(records.delete().where(records.c.series_id.in_(own)))  # by the index
            for table in (series, batches, graphs, layers, messages):
                conn.execute(table.delete().where(table.c.run_id == run_id))
            conn.execute(runs.delete().where(runs.c.id == run_id))

        try:
            self._write(delete)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot delete run '{run}' from {self.where}: {exc}") from exc
        finally:
            run_id_cached = self._run_ids.pop(run, None)
            if run_id_cached is not None:
                self._inserter.forget(run_id_cached)

    def close(self) -> None:
        """Finish the writes already submitted, stop the writer and release the store's connections.

        The Store must not be used afterwards.
        """
        self.writer.close()
        self.engine.dispose()
