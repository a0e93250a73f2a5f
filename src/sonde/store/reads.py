"""The store's readers: runs, layers and Records as DataFrames and dicts (a mixin of :class:`~sonde.store.Store`).

Every method runs its query in one read transaction on a connection of its own (``Store._read``),
never on the writer's: SQLite in WAL mode lets these read while the writer thread writes.

Example:
    >>> store.runs()[["name", "status", "steps"]]   # doctest: +SKIP
         name    status  steps
    0     mlp  finished    100
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from sqlalchemy import ColumnElement, Connection, func, select

from sonde.run_config import shown_config
from sonde.store.schema import layers, messages, records, runs, series
from sonde.store.status import shown_status

__all__ = ["COLUMNS", "StoreReads"]

#: The columns of :meth:`StoreReads.load`'s frame, in order.
COLUMNS = ["run", "step", "phase", "layer", "topic", "metric", "value"]
_FLOAT64 = np.dtype("<f8")
_T = TypeVar("_T")


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class StoreReads:
    """Runs, their layers and their Records, read back for ``sonde.load``, the API and the dashboard."""

    if TYPE_CHECKING:
        stall_after: float
        _heartbeat: Any  # the column that stands for a run's heartbeat in this store's schema
        _run_ids: dict[str, int]

        def _read(self, fn: Callable[[Connection], _T]) -> _T: ...
        def _run_id(self, conn: Connection, run: str) -> int: ...

    def runs(self) -> pd.DataFrame:
        """One row per run: name, model, framework, status, steps, started_at, updated_at, ended_at, heartbeat_at.

        ``steps`` is the last recorded step plus one (0 before any record); times are UTC timestamps.
        ``status`` is ``running``, ``finished``, ``failed``, or ``stalled`` for a running run whose
        writer has given no sign of life (``heartbeat_at``) for :attr:`stall_after` seconds.

        Example:
            >>> store.runs()[["name", "status", "steps"]]   # doctest: +SKIP
                 name    status  steps
            0     mlp  finished    100
        """
        cols = [runs.c.name, runs.c.model, runs.c.framework, runs.c.status,
                func.coalesce(runs.c.last_step + 1, 0).label("steps"),
                runs.c.started_at, runs.c.updated_at, runs.c.ended_at, self._heartbeat.label("heartbeat_at")]
        rows = self._read(lambda conn: conn.execute(select(*cols).order_by(runs.c.started_at, runs.c.id)).all())
        df = pd.DataFrame(rows, columns=[c.name for c in cols])
        df["steps"] = df["steps"].astype("int64")
        now = time.time()
        df["status"] = [self._status(status, beat, now) for status, beat in zip(df["status"], df["heartbeat_at"])]
        for name in ("started_at", "updated_at", "ended_at", "heartbeat_at"):
            df[name] = pd.to_datetime(df[name].astype("float64"), unit="s", utc=True)
        return df

    def _status(self, status: str, heartbeat_at: float | None, now: float) -> str:
        """The status readers see (the rule is :func:`sonde.store.status.shown_status`)."""
        beat = None if heartbeat_at is None or heartbeat_at != heartbeat_at else float(heartbeat_at)  # NaN: none
        return shown_status(str(status), beat, now=now, stall_after=self.stall_after)

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

    def has_run(self, run: str) -> bool:
        """Whether a run of that name is in the store."""
        if run in self._run_ids:
            return True
        found = self._read(lambda conn: conn.execute(select(runs.c.id).where(runs.c.name == run)).scalar())
        return found is not None

    def run_info(self, run: str) -> dict[str, Any] | None:
        """One run as a dict (name, model, framework, config, status, steps, times, layers), None if absent.

        Times are UTC seconds since the epoch; ``steps`` is the last recorded step plus one;
        ``status`` is the shown one, as in :meth:`runs` (``stalled`` for a running run gone silent).

        Example:
            >>> store.run_info("mlp")["status"]   # doctest: +SKIP
            'finished'
        """
        found = self._read(lambda conn: self._run_dicts(conn, run))
        return found[0] if found else None

    def run_infos(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The runs as :meth:`run_info` gives them, oldest first: at most ``limit`` of them (None:
        all), after skipping the first ``offset``."""
        return self._read(lambda conn: self._run_dicts(conn, None, limit, offset))

    def _run_dicts(self, conn: Connection, run: str | None, limit: int | None = None,
                   offset: int = 0) -> list[dict[str, Any]]:
        counts = (select(layers.c.run_id, func.count().label("n")).group_by(layers.c.run_id)).subquery()
        columns = [c for c in runs.c if c.name != "heartbeat_at"] + [self._heartbeat.label("heartbeat_at")]
        query = (select(*columns, func.coalesce(counts.c.n, 0).label("n_layers"))
                 .join_from(runs, counts, counts.c.run_id == runs.c.id, isouter=True)
                 .order_by(runs.c.started_at, runs.c.id))
        if run is not None:
            query = query.where(runs.c.name == run)
        if limit is not None or offset:
            query = query.limit(limit).offset(offset)
        now = time.time()
        return [{"name": row["name"], "model": row["model"], "framework": row["framework"],
                 "config": shown_config(row["config"]), "status": self._status(row["status"], row["heartbeat_at"], now),
                 "steps": 0 if row["last_step"] is None else int(row["last_step"]) + 1,
                 "started_at": row["started_at"], "updated_at": row["updated_at"], "ended_at": row["ended_at"],
                 "heartbeat_at": row["heartbeat_at"], "layers": int(row["n_layers"])}
                for row in conn.execute(query).mappings()]
