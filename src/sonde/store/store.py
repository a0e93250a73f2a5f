"""The SQL store: runs, their layers and their Records, over SQLite (default) or PostgreSQL.

One :class:`Store` wraps one SQLAlchemy engine. Writes go through one lock and one
transaction per batch; reads take their own pooled connection, so a dashboard or a notebook
can read while training writes (SQLite runs in WAL mode for exactly that).

Example:
    >>> store = open_store("sonde.db")                      # doctest: +SKIP
    >>> store.load("mlp-digits", topics=["weights"])        # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from sqlalchemy import ColumnElement, Connection, Engine, Update, case, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from sonde.errors import ConfigError, RunExistsError, StoreError
from sonde.records import Record
from sonde.sinks.base import RunInfo
from sonde.store.schema import layers, migrate, records, runs

__all__ = ["Store", "open_store"]

COLUMNS = ["run", "step", "phase", "layer", "topic", "metric", "value"]
_STATUSES = ("running", "finished", "failed")
_FLOAT64 = np.dtype("<f8")
_T = TypeVar("_T")
_INSERT_KEYS = ("run_id", "step", "phase", "layer", "topic", "metric", "value", "array")


def _storable(value: object) -> bool:
    try:
        _ = np.asarray(value, dtype=_FLOAT64) if isinstance(value, np.ndarray) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _sqlite_engine(url: str) -> Engine:
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


def _engine_for(path_or_url: str | Path) -> tuple[Engine, str]:
    text = str(path_or_url)
    if text.startswith("sqlite:"):
        return _sqlite_engine(text), text
    if text.startswith("postgresql"):
        return create_engine(text, pool_pre_ping=True), text
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
    return _sqlite_engine(f"sqlite:///{path}"), str(path)


def open_store(path_or_url: str | Path = "sonde.db", *, create: bool = True) -> Store:
    """Open (and create or migrate) a store from a file path or a database URL.

    A plain path becomes an SQLite file in WAL mode, its directories created as needed;
    a URL starting with ``sqlite:`` or ``postgresql`` (``postgresql+psycopg://...``) is used as is.

    Args:
        path_or_url: file path or SQLAlchemy URL.
        create: when False, a missing SQLite file is an error instead of a new store.

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
        engine, where = _engine_for(path_or_url)
    except StoreError:
        raise
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open the sonde store '{text}': {exc}; check the URL and its driver") from exc
    try:
        migrate(engine)
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        engine.dispose()
        detail = getattr(exc, "orig", None) or exc
        raise StoreError(
            f"cannot open the sonde store '{where}': {detail}; pass store= a writable file path or a reachable "
            "database URL"
        ) from exc
    return Store(engine, where)


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class Store:
    """Runs, layers and Records in one SQL database. Build it with :func:`open_store`.

    Example:
        >>> store = open_store("sonde.db")                                   # doctest: +SKIP
        >>> first = store.start_run(RunInfo("mlp"), resume=False)            # doctest: +SKIP
        >>> store.write("mlp", [Record("mlp", first, "train", "fc1", "weights", "norm", 1.5)])  # doctest: +SKIP
        >>> store.finish_run("mlp", "finished")                              # doctest: +SKIP
    """

    def __init__(self, engine: Engine, where: str) -> None:
        self.engine = engine
        self.where = where
        self._lock = threading.RLock()
        self._run_ids: dict[str, int] = {}
        insert = records.insert().compile(dialect=engine.dialect, column_keys=list(_INSERT_KEYS))
        self._insert_sql = str(insert)
        # Positional drivers (sqlite3: ``?``) take tuples in the compiled order; named ones take dicts.
        self._insert_positional = bool(insert.positional) and tuple(insert.positiontup or ()) == _INSERT_KEYS
        # One shared in-memory connection cannot serve a reader and a writer at once.
        self._read_lock: threading.RLock | None = self._lock if isinstance(engine.pool, StaticPool) else None

    def __repr__(self) -> str:
        return f"Store({self.where!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------

    def _write_conn(self) -> Connection:
        return self.engine.connect().execution_options(sonde_write=True)

    def _read_conn(self) -> Connection:
        return self.engine.connect()

    def unique_run_name(self, base: str) -> str:
        """``base`` when no run has that name, else the first free ``base-2``, ``base-3``, ...

        Example:
            >>> store.unique_run_name("mlp")   # doctest: +SKIP
            'mlp-2'
        """
        with self._read_conn() as conn:
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
        """
        now = time.time()
        try:
            with self._lock, self._write_conn() as conn, conn.begin():
                row = conn.execute(select(runs.c.id, runs.c.last_step).where(runs.c.name == info.name)).first()
                if row is None:
                    run_id = conn.execute(
                        runs.insert().values(
                            name=info.name, model=info.model, framework=info.framework,
                            config=json.dumps(info.config, default=str, sort_keys=True),
                            status="running", started_at=now, updated_at=now,
                        )
                    ).inserted_primary_key[0]  # type: ignore[index]  # always set after an INSERT
                    first_step = 0
                elif not resume:
                    count = conn.execute(select(func.count()).where(records.c.run_id == row.id)).scalar()
                    last = "none" if row.last_step is None else row.last_step
                    raise RunExistsError(
                        f"run '{info.name}' already exists in {self.where} ({count} records, last step {last}); "
                        f"pass resume=True to append to it, or choose another run name such as "
                        f"'{self.unique_run_name(info.name)}'"
                    )
                else:
                    run_id = row.id
                    conn.execute(
                        runs.update().where(runs.c.id == run_id).values(status="running", updated_at=now, ended_at=None)
                    )
                    first_step = 0 if row.last_step is None else row.last_step + 1
                self._upsert_layers(conn, run_id, info)
        except IntegrityError as exc:  # another process created the same name between our SELECT and INSERT
            raise RunExistsError(
                f"run '{info.name}' was just created in {self.where} by another writer; pass resume=True "
                f"or choose another run name such as '{self.unique_run_name(info.name)}'"
            ) from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot start run '{info.name}' in {self.where}: {exc}") from exc
        self._run_ids[info.name] = int(run_id)
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
        if not batch:
            return
        run_id = self._run_ids.get(run) or self._read(lambda conn: self._run_id(conn, run))
        try:
            rows = [self._row(run_id, r) for r in batch]
        except (TypeError, ValueError) as exc:
            bad = next(r for r in batch if not _storable(r.value))
            raise StoreError(f"cannot store {bad!r}: value must be a float or a 1-D float array ({exc})") from exc
        steps = [r.step for r in batch if isinstance(r.step, int)]
        params: list[Any] = rows
        if not self._insert_positional:  # e.g. psycopg: %(name)s placeholders
            params = [dict(zip(_INSERT_KEYS, row, strict=True)) for row in rows]
        try:
            with self._lock, self._write_conn() as conn, conn.begin():
                # The statement is compiled once (see __init__) and handed straight to the driver's
                # executemany: SQLAlchemy's per-row parameter processing would halve the throughput.
                conn.exec_driver_sql(self._insert_sql, params)
                conn.execute(self._touch(run_id, max(steps, default=None)))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot write {len(rows)} records of run '{run}' to {self.where}: {exc}") from exc

    @staticmethod
    def _row(run_id: int, r: Record) -> tuple[Any, ...]:
        v = r.value
        if isinstance(v, np.ndarray) and v.ndim > 0:
            return (run_id, r.step, r.phase, r.layer, r.topic, r.metric, None,
                    np.ascontiguousarray(v, dtype=_FLOAT64).tobytes())
        return (run_id, r.step, r.phase, r.layer, r.topic, r.metric, float(v), None)

    @staticmethod
    def _touch(run_id: int, last: int | None) -> Update:
        values: dict[str, Any] = {"updated_at": time.time()}
        if last is not None:
            # Portable max(last_step, last): GREATEST is PostgreSQL-only, two-argument MAX SQLite-only.
            values["last_step"] = case(
                (runs.c.last_step.is_(None), last), (runs.c.last_step < last, last), else_=runs.c.last_step
            )
        return runs.update().where(runs.c.id == run_id).values(**values)

    def finish_run(self, run: str, status: str = "finished") -> None:
        """Mark ``run`` as ``finished`` or ``failed`` (or back to ``running``) and stamp its end."""
        if status not in _STATUSES:
            raise ConfigError(f"run status must be one of {', '.join(_STATUSES)}; got {status!r}")
        now = time.time()
        ended = None if status == "running" else now
        try:
            with self._lock, self._write_conn() as conn, conn.begin():
                run_id = self._run_id(conn, run)
                update = runs.update().where(runs.c.id == run_id)
                conn.execute(update.values(status=status, updated_at=now, ended_at=ended))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot finish run '{run}' in {self.where}: {exc}") from exc

    # -- reading --------------------------------------------------------------------------

    def _read(self, fn: Callable[[Connection], _T]) -> _T:
        """Run ``fn(conn)`` in one read transaction (one consistent snapshot)."""
        guard: AbstractContextManager[Any] = self._read_lock or nullcontext()
        try:
            with guard, self._read_conn() as conn, conn.begin():
                return fn(conn)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read {self.where}: {exc}") from exc

    def runs(self) -> pd.DataFrame:
        """One row per run: name, model, framework, status, steps, started_at, updated_at, ended_at.

        ``steps`` is the last recorded step plus one (0 before any record); times are UTC timestamps.

        Example:
            >>> store.runs()[["name", "status", "steps"]]   # doctest: +SKIP
                 name    status  steps
            0     mlp  finished    100
        """
        cols = [runs.c.name, runs.c.model, runs.c.framework, runs.c.status,
                func.coalesce(runs.c.last_step + 1, 0).label("steps"),
                runs.c.started_at, runs.c.updated_at, runs.c.ended_at]
        rows = self._read(lambda conn: conn.execute(select(*cols).order_by(runs.c.started_at, runs.c.id)).all())
        df = pd.DataFrame(rows, columns=[c.name for c in cols])
        df["steps"] = df["steps"].astype("int64")
        for name in ("started_at", "updated_at", "ended_at"):
            df[name] = pd.to_datetime(df[name].astype("float64"), unit="s", utc=True)
        return df

    def layers(self, run: str) -> pd.DataFrame:
        """The probed layers of ``run`` in probe order: position, name, type, param_shapes (a dict).

        Raises:
            ConfigError: no run has that name.
        """
        cols = [layers.c.position, layers.c.name, layers.c.type, layers.c.param_shapes]

        def query(conn: Connection) -> list[Any]:
            run_id = self._run_id(conn, run)
            return list(conn.execute(select(*cols).where(layers.c.run_id == run_id).order_by(layers.c.position)))

        df = pd.DataFrame(self._read(query), columns=["position", "name", "type", "param_shapes"])
        df["position"] = df["position"].astype("int64")
        df["param_shapes"] = [json.loads(s) for s in df["param_shapes"]]
        return df

    def load(
        self,
        run: str | Iterable[str] | None = None,
        *,
        layers: str | Iterable[str] | None = None,
        topics: str | Iterable[str] | None = None,
        metrics: str | Iterable[str] | None = None,
        phase: str | None = None,
        arrays: bool = False,
    ) -> pd.DataFrame:
        """Records as a tidy DataFrame with columns run, step, phase, layer, topic, metric, value.

        Sorted by run, step, layer, topic, metric. With ``arrays=False`` only scalar records
        (``value`` float64); with ``arrays=True`` only array records (``value`` a float64 ndarray).

        Raises:
            ConfigError: a run name that is not in the store (the message lists those that are).

        Example:
            >>> store.load("mlp", layers="fc1", topics=["weights"], metrics="norm")   # doctest: +SKIP
               run  step  phase layer    topic metric  value
            0  mlp     0  train   fc1  weights   norm   1.50
        """
        names, filters = _as_list(run), list[ColumnElement[bool]]()
        for column, wanted in ((records.c.layer, layers), (records.c.topic, topics), (records.c.metric, metrics)):
            values = _as_list(wanted)
            if values is not None:
                filters.append(column.in_(values))
        if phase is not None:
            filters.append(records.c.phase == phase)
        filters.append(records.c.array.is_not(None) if arrays else records.c.array.is_(None))
        payload = records.c.array if arrays else records.c.value

        def query(conn: Connection) -> list[Any]:
            where = list(filters)
            if names is not None:
                where.append(records.c.run_id.in_([self._run_id(conn, n) for n in names]))
            stmt = (select(runs.c.name, records.c.step, records.c.phase, records.c.layer, records.c.topic,
                           records.c.metric, payload)
                    .join_from(records, runs, records.c.run_id == runs.c.id).where(*where).order_by(records.c.id))
            # Plain tuples: pandas probes each Row for namedtuple fields, which is slow on Rows.
            return [tuple(row) for row in conn.execute(stmt)]

        df = pd.DataFrame(self._read(query), columns=COLUMNS)
        df["step"] = df["step"].astype("int64")
        if arrays:
            df["value"] = pd.Series([np.frombuffer(b, dtype=_FLOAT64).astype(np.float64) for b in df["value"]],
                                    index=df.index, dtype=object)
        else:
            df["value"] = df["value"].astype("float64")  # NULL (a NaN on SQLite) becomes NaN
        # Sort here, not in SQL: text collation differs between databases, Python's order does not.
        df = df.sort_values(["run", "step", "layer", "topic", "metric"], kind="stable", ignore_index=True)
        return df

    def close(self) -> None:
        """Release the store's connections; the Store must not be used afterwards."""
        with self._lock:
            self.engine.dispose()

