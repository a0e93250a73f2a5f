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
from itertools import repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from sqlalchemy import ColumnElement, Connection, Engine, Update, case, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from sonde.errors import ConfigError, RunExistsError, StoreError
from sonde.records import Record
from sonde.sinks.base import RunInfo
from sonde.store.engine import engine_for, paused_gc
from sonde.store.schema import batches, graphs, layers, messages, migrate, records, runs, series
from sonde.store.views import StoreViews

__all__ = ["Store", "open_store"]

COLUMNS = ["run", "step", "phase", "layer", "topic", "metric", "value"]
_STATUSES = ("running", "finished", "failed")
_FLOAT64 = np.dtype("<f8")
_T = TypeVar("_T")
_INSERT_KEYS = ("run_id", "step", "value", "array", "series_id")  # the table's column order
_Key = tuple[str, str, str, str]  # phase, layer, topic, metric
_BY_SERIES = itemgetter(_INSERT_KEYS.index("series_id"))
_STEP, _VALUE, _MESSAGE = attrgetter("step"), attrgetter("value"), attrgetter("message")
_PHASE, _LAYER, _TOPIC, _METRIC = (attrgetter(k) for k in ("phase", "layer", "topic", "metric"))


def _storable(value: object) -> bool:
    try:
        _ = np.asarray(value, dtype=_FLOAT64) if isinstance(value, np.ndarray) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


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
        engine, where = engine_for(path_or_url)
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


def _message_row(run_id: int, r: Record) -> dict[str, Any]:
    return {"run_id": run_id, "step": r.step, "phase": r.phase, "layer": r.layer, "topic": r.topic,
            "metric": r.metric, "message": r.message}


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class Store(StoreViews):
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
        self._series: dict[int, dict[_Key, int]] = {}  # run id -> series key -> series id, as committed
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
                    own = select(series.c.id).where(series.c.run_id == row.id)
                    count = conn.execute(select(func.count()).where(records.c.series_id.in_(own))).scalar()
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
        try:
            with self._lock, self._write_conn() as conn, conn.begin():
                if batch_id is not None:
                    seen = select(batches.c.batch_id).where(batches.c.run_id == run_id, batches.c.batch_id == batch_id)
                    if conn.execute(seen).first() is not None:
                        return False
                    # Under PostgreSQL a concurrent writer of the same batch blocks here on the
                    # primary key until the first commits, then fails: caught below as a duplicate.
                    conn.execute(batches.insert().values(run_id=run_id, batch_id=batch_id, received_at=time.time()))
                if batch:
                    with paused_gc():
                        try:
                            rows = self._rows(run_id, batch, self._series.get(run_id, {}))
                        except KeyError:  # a series this store has not written yet
                            rows = self._rows(run_id, batch, self._series_ids(conn, run_id, batch))
                        # Grouped by series (stable: a series keeps its order), the index's leaf pages
                        # are each visited once per batch, not once per step: 10-30% more Records/s.
                        rows.sort(key=_BY_SERIES)
                        self._insert(conn, rows)
                    conn.execute(self._touch(run_id, last if isinstance(last, int) else None))
                    notes = [_message_row(run_id, r) for r in filter(_MESSAGE, batch)]
                    if notes:  # alerts: their text beside the Record
                        conn.execute(messages.insert(), notes)
        except IntegrityError as exc:
            if batch_id is not None and self._batch_seen(run_id, batch_id):
                return False  # a concurrent writer stored the same batch first
            raise StoreError(f"cannot write {len(batch)} records of run '{run}' to {self.where}: {exc}") from exc
        except SQLAlchemyError as exc:
            self._series.pop(run_id, None)  # new catalog rows may have been rolled back with the batch
            raise StoreError(f"cannot write {len(batch)} records of run '{run}' to {self.where}: {exc}") from exc
        except StoreError:
            self._series.pop(run_id, None)
            raise
        return True

    def _rows(self, run_id: int, batch: Sequence[Record], ids: dict[_Key, int]) -> list[tuple[Any, ...]]:
        try:
            # Column by column with C-level maps: a third of the time of a loop over Records.
            sids = list(map(ids.__getitem__, zip(map(_PHASE, batch), map(_LAYER, batch), map(_TOPIC, batch),
                                                 map(_METRIC, batch))))
            values = list(map(_VALUE, batch))
            if set(map(type, values)) <= {float}:
                # NaN is stored as NULL on every database (SQLite does so by itself), so that
                # min, max and mean skip it alike on SQLite and PostgreSQL.
                scalars = [v if v == v else None for v in values]
                return list(zip(repeat(run_id), map(_STEP, batch), scalars, repeat(None), sids))
            payloads = [self._payload(v) for v in values]
            return [(run_id, r.step, value, array, sid)
                    for r, (value, array), sid in zip(batch, payloads, sids)]
        except (TypeError, ValueError) as exc:
            bad = next((r for r in batch if not _storable(r.value)), None)
            if bad is None:  # the names, not the value: e.g. a list where a layer name belongs
                raise StoreError(f"cannot store a Record of this batch: phase, layer, topic and metric must be "
                                 f"strings ({exc})") from exc
            raise StoreError(f"cannot store {bad!r}: value must be a float or a 1-D float array ({exc})") from exc

    def _series_ids(self, conn: Connection, run_id: int, batch: Sequence[Record]) -> dict[_Key, int]:
        """The catalog id of every series in ``batch``, creating the rows of new ones."""
        known = self._series.get(run_id, {})
        missing: set[_Key] = set()
        for r in batch:  # only for batches that bring a new series: the names are checked here
            key = (r.phase, r.layer, r.topic, r.metric)
            if not all(isinstance(x, str) for x in key):
                raise StoreError(f"cannot store {r!r}: phase, layer, topic and metric must be strings")
            if key not in known:
                missing.add(key)
        if not missing:
            return known
        rows = [{"run_id": run_id, "phase": p, "layer": la, "topic": t, "metric": m} for p, la, t, m in missing]
        insert: Any = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(series)
        conn.execute(insert.on_conflict_do_nothing(), rows)
        query = select(series.c.id, series.c.phase, series.c.layer, series.c.topic, series.c.metric)
        fresh = {(p, la, t, m): int(i) for i, p, la, t, m in conn.execute(query.where(series.c.run_id == run_id))}
        self._series[run_id] = fresh  # dropped again if this transaction fails (see _store)
        return fresh

    def _batch_seen(self, run_id: int, batch_id: str) -> bool:
        query = select(batches.c.batch_id).where(batches.c.run_id == run_id, batches.c.batch_id == batch_id)
        return self._read(lambda conn: conn.execute(query).first() is not None)

    def _insert(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        if conn.dialect.name == "postgresql":
            # COPY is several times faster than executemany of INSERTs on PostgreSQL.
            import psycopg

            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            columns = ", ".join(f'"{k}"' for k in _INSERT_KEYS)  # "array" is a reserved word there
            try:
                with cursor.copy(f"COPY records ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            except psycopg.Error as exc:
                raise StoreError(f"cannot write {len(rows)} records to {self.where}: {exc}") from exc
            return
        params: list[Any] = rows
        if not self._insert_positional:  # a named-placeholder driver
            params = [dict(zip(_INSERT_KEYS, row, strict=True)) for row in rows]
        # The statement is compiled once (see __init__) and handed straight to the driver's
        # executemany: SQLAlchemy's per-row parameter processing would halve the throughput.
        conn.exec_driver_sql(self._insert_sql, params)

    @staticmethod
    def _payload(v: Any) -> tuple[float | None, bytes | None]:
        """``(value, array)`` columns of a Record's value: a float (NaN as NULL), or float64 bytes."""
        if isinstance(v, np.ndarray) and v.ndim > 0:
            return None, np.ascontiguousarray(v, dtype=_FLOAT64).tobytes()
        f = float(v)
        return (f if f == f else None), None

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
        messages: bool = False,
    ) -> pd.DataFrame:
        """Records as a tidy DataFrame with columns run, step, phase, layer, topic, metric, value.

        Sorted by run, step, layer, topic, metric. With ``arrays=False`` only scalar records
        (``value`` float64); with ``arrays=True`` only array records (``value`` a float64 ndarray).
        With ``messages=True`` a ``message`` column holds the text of the Records that carry one
        (``alert``: value 1.0 and what is wrong), ``""`` elsewhere.

        Raises:
            ConfigError: a run name that is not in the store (the message lists those that are).

        Example:
            >>> store.load("mlp", layers="fc1", topics=["weights"], metrics="norm")   # doctest: +SKIP
               run  step  phase layer    topic metric  value
            0  mlp     0  train   fc1  weights   norm   1.50
        """
        names, filters = _as_list(run), list[ColumnElement[bool]]()
        for column, wanted in ((series.c.layer, layers), (series.c.topic, topics), (series.c.metric, metrics)):
            values = _as_list(wanted)
            if values is not None:
                filters.append(column.in_(values))
        if phase is not None:
            filters.append(series.c.phase == phase)
        filters.append(records.c.array.is_not(None) if arrays else records.c.array.is_(None))
        payload = records.c.array if arrays else records.c.value

        def query(conn: Connection) -> list[Any]:
            where = list(filters)
            if names is not None:
                where.append(series.c.run_id.in_([self._run_id(conn, n) for n in names]))
            # From the catalog to the records: the (series_id, step) index finds each series' rows.
            stmt = (select(runs.c.name, records.c.step, series.c.phase, series.c.layer, series.c.topic,
                           series.c.metric, payload)
                    .join_from(series, runs, series.c.run_id == runs.c.id)
                    .join(records, records.c.series_id == series.c.id).where(*where).order_by(records.c.id))
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
        if messages:
            df["message"] = self._messages(df)
        return df

    def _messages(self, df: pd.DataFrame) -> list[str]:
        """The message of each row of a loaded frame ("" for Records without one)."""
        keys = ("step", "phase", "layer", "topic", "metric")

        def query(conn: Connection) -> dict[tuple[Any, ...], str]:
            stmt = select(runs.c.name, *(messages.c[k] for k in keys), messages.c.message).join_from(
                messages, runs, messages.c.run_id == runs.c.id).where(runs.c.name.in_(df["run"].unique().tolist()))
            return {tuple(row[:-1]): row[-1] for row in conn.execute(stmt)}

        found = self._read(query) if len(df) else {}
        rows = zip(df["run"], *(df[k] for k in keys))
        return [found.get((run, int(step), *rest), "") for run, step, *rest in rows]

    # -- runs ---------------------------------------------------------------------------------

    def has_run(self, run: str) -> bool:
        """Whether a run of that name is in the store."""
        if run in self._run_ids:
            return True
        found = self._read(lambda conn: conn.execute(select(runs.c.id).where(runs.c.name == run)).scalar())
        return found is not None

    def run_info(self, run: str) -> dict[str, Any] | None:
        """One run as a dict (name, model, framework, config, status, steps, times, layers), None if absent.

        Times are UTC seconds since the epoch; ``steps`` is the last recorded step plus one.

        Example:
            >>> store.run_info("mlp")["status"]   # doctest: +SKIP
            'finished'
        """
        found = self._read(lambda conn: self._run_dicts(conn, run))
        return found[0] if found else None

    def run_infos(self) -> list[dict[str, Any]]:
        """Every run as :meth:`run_info` gives it, oldest first."""
        return self._read(lambda conn: self._run_dicts(conn, None))

    @staticmethod
    def _run_dicts(conn: Connection, run: str | None) -> list[dict[str, Any]]:
        counts = (select(layers.c.run_id, func.count().label("n")).group_by(layers.c.run_id)).subquery()
        query = (select(runs, func.coalesce(counts.c.n, 0).label("n_layers"))
                 .join_from(runs, counts, counts.c.run_id == runs.c.id, isouter=True)
                 .order_by(runs.c.started_at, runs.c.id))
        if run is not None:
            query = query.where(runs.c.name == run)
        return [{"name": row["name"], "model": row["model"], "framework": row["framework"],
                 "config": json.loads(row["config"]), "status": row["status"],
                 "steps": 0 if row["last_step"] is None else int(row["last_step"]) + 1,
                 "started_at": row["started_at"], "updated_at": row["updated_at"], "ended_at": row["ended_at"],
                 "layers": int(row["n_layers"])} for row in conn.execute(query).mappings()]

    def delete_run(self, run: str) -> None:
        """Delete ``run`` with its layers, Records, graph, series catalog and batch ids.

        Raises:
            ConfigError: no run has that name.

        Example:
            >>> store.delete_run("mlp-2")   # doctest: +SKIP
        """
        try:
            with self._lock, self._write_conn() as conn, conn.begin():
                run_id = self._run_id(conn, run)
                # Children first and explicitly: SQLite enforces no foreign keys unless asked to.
                own = select(series.c.id).where(series.c.run_id == run_id)
                conn.execute(records.delete().where(records.c.series_id.in_(own)))  # by the index
                for table in (series, batches, graphs, layers, messages):
                    conn.execute(table.delete().where(table.c.run_id == run_id))
                conn.execute(runs.delete().where(runs.c.id == run_id))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot delete run '{run}' from {self.where}: {exc}") from exc
        finally:
            run_id_cached = self._run_ids.pop(run, None)
            if run_id_cached is not None:
                self._series.pop(run_id_cached, None)

    def close(self) -> None:
        """Release the store's connections; the Store must not be used afterwards."""
        with self._lock:
            self.engine.dispose()

