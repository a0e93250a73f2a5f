"""The store's plotting, graph and catalog methods (a mixin of :class:`~sonde.store.Store`).

The SQL lives in :mod:`sonde.store.queries`; these methods check their arguments, find the run
and run the query in one read transaction.

Example:
    >>> store.series("mlp", "fc1", "weights", "norm", max_points=500)["max"][:2]   # doctest: +SKIP
    [1.5, 1.52]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.exc import SQLAlchemyError

from sonde.errors import ConfigError, StoreError
from sonde.store import queries
from sonde.store.matrix import matrix as matrix_query
from sonde.store.schema import graphs, series

__all__ = ["StoreViews"]

_T = TypeVar("_T")

#: The most columns a heatmap or histogram view asks for (each is one bound parameter of an IN list).
_MAX_COLUMNS = 5000


def _check_limit(name: str, value: int, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ConfigError(f"{name} must be an integer from 1 to {most}; got {value!r}")


def _check_step(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{name} must be None or a step (an integer from 0); got {value!r}")


class StoreViews:
    """Graphs, the series catalog and the downsampled queries behind the REST API and the dashboard."""

    if TYPE_CHECKING:
        where: str

        def _read(self, fn: Callable[[Connection], _T]) -> _T: ...
        def _run_id(self, conn: Connection, run: str) -> int: ...
        def _write(self, fn: Callable[[Connection], _T]) -> _T: ...

    def put_graph(self, run: str, graph: dict[str, Any]) -> None:
        """Store ``run``'s topology (any JSON object, e.g. ``sonde.graph(...).to_json()``), replacing any.

        Raises:
            ConfigError: no run has that name, or ``graph`` is not a JSON-serialisable dict.
        """
        if not isinstance(graph, dict):
            raise ConfigError(f"a graph must be a JSON object (dict); got {type(graph).__name__}")
        try:
            text = json.dumps(graph, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the graph of run '{run}' is not JSON-serialisable: {exc}") from exc
        def put(conn: Connection) -> None:
            run_id = self._run_id(conn, run)
            conn.execute(graphs.delete().where(graphs.c.run_id == run_id))
            conn.execute(graphs.insert().values(run_id=run_id, graph=text, updated_at=time.time()))

        try:
            self._write(put)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot store the graph of run '{run}' in {self.where}: {exc}") from exc

    def get_graph(self, run: str) -> dict[str, Any] | None:
        """``run``'s stored graph, None when none was stored.

        Raises:
            ConfigError: no run has that name.
        """
        def query(conn: Connection) -> str | None:
            run_id = self._run_id(conn, run)
            return conn.execute(select(graphs.c.graph).where(graphs.c.run_id == run_id)).scalar()

        text = self._read(query)
        return None if text is None else dict(json.loads(text))

    def available(self, run: str) -> list[tuple[str, str, str]]:
        """The (phase, topic, metric) triples ``run`` has Records of, sorted.

        Example:
            >>> store.available("mlp")[:2]   # doctest: +SKIP
            [('train', 'activations', 'mean'), ('train', 'activations', 'std')]
        """
        def query(conn: Connection) -> list[tuple[str, str, str]]:
            run_id = self._run_id(conn, run)
            stmt = select(series.c.phase, series.c.topic, series.c.metric).where(series.c.run_id == run_id).distinct()
            return sorted((str(p), str(t), str(m)) for p, t, m in conn.execute(stmt))

        return self._read(query)

    def series(self, run: str, layer: str, topic: str, metric: str, phase: str = "train", max_points: int = 2000,
               start: int | None = None, end: int | None = None) -> dict[str, list[Any]]:
        """One scalar metric over steps, downsampled in SQL to at most ``max_points`` buckets.

        Returns ``{"step", "value", "min", "max"}``: per bucket its first step, mean, minimum and
        maximum, so a one-step spike survives in ``max``. ``start``/``end`` bound the steps (inclusive).

        Raises:
            ConfigError: no run has that name, or ``max_points`` is below 1.

        Example:
            >>> s = store.series("mlp", "fc1", "weights", "norm", max_points=500)   # doctest: +SKIP
            >>> len(s["step"]) <= 500                                               # doctest: +SKIP
            True
        """
        _check_limit("max_points", max_points, 1_000_000)
        return self._read(lambda conn: queries.series(
            conn, self._run_id(conn, run), layer, topic, metric, phase, max_points, start, end))

    def heatmap(self, run: str, topic: str, metric: str, phase: str = "train", max_steps: int = 400,
                start: int | None = None, end: int | None = None) -> dict[str, Any]:
        """Every layer's value of one topic's metric: ``{"layers", "steps", "values", "truncated"}`` (rows in
        forward order).

        At most ``max_steps`` recorded steps, picked evenly over the run, or over the steps
        ``start..end`` (inclusive; either may be None for open) when given, e.g. the range a
        dashboard zoomed into; a missing or NaN cell is None. At most :data:`~sonde.store.queries.MAX_CELLS`
        values come back (fewer columns, at most ``MAX_LAYERS`` rows); ``truncated`` says when that cut it.

        Raises:
            ConfigError: no run has that name, ``max_steps`` is not in 1..5000, or ``start``/``end``
                is not a step (an integer from 0).

        Example:
            >>> h = store.heatmap("mlp", "weight_grads", "norm")   # doctest: +SKIP
            >>> h["layers"], len(h["values"][0]) == len(h["steps"])   # doctest: +SKIP
            (['fc1', 'fc2'], True)
            >>> store.heatmap("mlp", "weight_grads", "norm", start=1000, end=1999)["steps"][:2]   # doctest: +SKIP
            [1000, 1001]
        """
        _check_limit("max_steps", max_steps, _MAX_COLUMNS)
        _check_step("start", start)
        _check_step("end", end)
        return self._read(lambda conn: queries.heatmap(conn, self._run_id(conn, run), topic, metric, phase, max_steps,
                                                       start, end))

    def matrix(self, run: str, topic: str, prefix: str, phase: str = "train",
               step: int | None = None) -> dict[str, Any]:
        """A metric recorded once per ordered layer pair (layer ``a``, metric ``prefix + b``) at one step.

        Returns ``{"layers", "steps", "step", "values"}``: both axes in forward order, every step
        the matrix was recorded at, the step shown (``step`` when recorded there, else the latest)
        and ``values[i][j]`` (None where missing or NaN). See :mod:`sonde.store.matrix`.

        Raises:
            ConfigError: no run has that name, or ``prefix`` is empty.

        Example:
            >>> m = store.matrix("mlp", "activations", "cka_matrix:")   # doctest: +SKIP
            >>> m["layers"], m["values"][0][0]                          # doctest: +SKIP
            (['fc1', 'relu', 'fc2'], 1.0)
        """
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"prefix must be a non-empty metric name prefix such as 'cka_matrix:'; got {prefix!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise ConfigError(f"step must be an integer or None (the latest); got {step!r}")
        return self._read(lambda conn: matrix_query(conn, self._run_id(conn, run), topic, prefix, phase, step))

    def histograms(self, run: str, layer: str, topic: str, phase: str = "train",
                   max_steps: int = 200) -> dict[str, Any]:
        """One layer's ``histogram`` counts over training: ``{"steps", "edges", "counts", "truncated"}``.

        At most ``MAX_BINS`` bins per step (finer histograms merged) and at most ``MAX_CELLS`` values
        (fewer steps); ``truncated`` says when that cut it (see :mod:`sonde.store.queries`).

        Raises:
            ConfigError: no run has that name, or ``max_steps`` is not in 1..5000.

        Example:
            >>> h = store.histograms("mlp", "fc1", "weights")   # doctest: +SKIP
            >>> len(h["counts"][0]) == len(h["edges"]) - 1      # doctest: +SKIP
            True
        """
        _check_limit("max_steps", max_steps, _MAX_COLUMNS)
        return self._read(lambda conn: queries.histograms(conn, self._run_id(conn, run), layer, topic, phase,
                                                          max_steps))
