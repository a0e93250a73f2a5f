"""Read queries for plotting: downsampled series, layer × step heatmaps, histograms over time.

Every query runs in SQL on one connection and returns plain Python lists, ready for JSON or a
chart. They are the code behind :meth:`Store.series`, :meth:`Store.heatmap` and
:meth:`Store.histograms`; the server's REST API and the dashboard both call those.

* A **series** longer than ``max_points`` is cut into buckets of equal step width, grouped in
  SQL: each bucket keeps its first step, the mean, the minimum and the maximum, so a spike of one
  step still shows in ``max`` however far the series is zoomed out.
* A **heatmap** and a **histogram view** show at most ``max_steps`` columns: recorded steps picked
  evenly across the run, each column one step's values (an index lookup per cell, never a scan of
  every record of a 200-layer run).

Example:
    >>> with engine.connect() as conn:                                   # doctest: +SKIP
    ...     series(conn, run_id, "fc1", "weights", "norm", "train", 2000, None, None)["max"][:3]
    [1.5, 1.52, 1.55]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Connection, Integer, func, literal_column, select

from sonde.store.schema import layers, records
from sonde.store.schema import series as series_table

__all__ = ["evenly", "heatmap", "histograms", "series"]

_FLOAT64 = np.dtype("<f8")


def evenly(items: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` items of ``items``, evenly spaced, the first and the last always kept.

    Example:
        >>> evenly(list(range(10)), 4)
        [0, 3, 6, 9]
    """
    n = len(items)
    if n <= limit:
        return list(items)
    if limit == 1:
        return [items[-1]]
    return [items[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def _scalar_filter(run_id: int, layer: str, topic: str, metric: str, phase: str) -> list[ColumnElement[bool]]:
    # Column order matches ix_records_series, so every query below is an index range scan.
    return [records.c.run_id == run_id, records.c.layer == layer, records.c.topic == topic,
            records.c.metric == metric, records.c.phase == phase]


def series(
    conn: Connection, run_id: int, layer: str, topic: str, metric: str, phase: str,
    max_points: int, start: int | None, end: int | None,
) -> dict[str, list[Any]]:
    """One metric of one layer over steps ``start..end`` (inclusive), at most ``max_points`` buckets.

    Returns ``{"step", "value", "min", "max"}`` lists of equal length: the bucket's first step,
    its mean, minimum and maximum (all three the raw value when no downsampling was needed).
    NaN values are stored as NULL and skipped; a bucket of only NaN gives None.
    """
    where = [*_scalar_filter(run_id, layer, topic, metric, phase), records.c.array.is_(None)]
    if start is not None:
        where.append(records.c.step >= start)
    if end is not None:
        where.append(records.c.step <= end)
    step, value = records.c.step, records.c.value
    lo, hi, count = conn.execute(select(func.min(step), func.max(step), func.count()).where(*where)).one()
    if not count:
        return {"step": [], "value": [], "min": [], "max": []}
    if count <= max_points:
        rows = conn.execute(select(step, value).where(*where).order_by(step, records.c.id)).all()
        steps = [int(r[0]) for r in rows]
        values = [None if r[1] is None else float(r[1]) for r in rows]
        return {"step": steps, "value": values, "min": list(values), "max": list(values)}
    width = -(-(int(hi) - int(lo) + 1) // max_points)
    # Literal integers, not bound parameters: PostgreSQL matches GROUP BY expressions textually,
    # and integer division truncates alike on SQLite and PostgreSQL (step - lo is never negative).
    bucket = (step - literal_column(str(int(lo)), Integer)) // literal_column(str(width), Integer)
    query = (select(func.min(step), func.avg(value), func.min(value), func.max(value))
             .where(*where).group_by(bucket).order_by(func.min(step)))
    out: dict[str, list[Any]] = {"step": [], "value": [], "min": [], "max": []}
    for first, mean, low, high in conn.execute(query):
        out["step"].append(int(first))
        out["value"].append(None if mean is None else float(mean))
        out["min"].append(None if low is None else float(low))
        out["max"].append(None if high is None else float(high))
    return out


def _ordered_layers(conn: Connection, run_id: int, names: set[str]) -> list[str]:
    """``names`` in the run's forward (probe) order; layers the run did not declare come last, sorted."""
    declared = conn.execute(select(layers.c.name).where(layers.c.run_id == run_id).order_by(layers.c.position))
    order = [n for n in declared.scalars() if n in names]
    return order + sorted(names.difference(order))


def _steps(conn: Connection, where: list[ColumnElement[bool]]) -> list[int]:
    return [int(s) for s in conn.execute(select(records.c.step).where(*where).distinct().order_by(records.c.step))
            .scalars()]


def heatmap(
    conn: Connection, run_id: int, topic: str, metric: str, phase: str, max_steps: int,
) -> dict[str, list[Any]]:
    """One metric of one topic for every layer that has it: layers as rows, steps as columns.

    The columns are at most ``max_steps`` recorded steps, picked evenly over the run (the steps of
    the first layer in forward order); each cell is that layer's value at that step, None where the
    layer has no value there or it is NaN.
    """
    names = set(conn.execute(
        select(series_table.c.layer).where(series_table.c.run_id == run_id, series_table.c.phase == phase,
                                           series_table.c.topic == topic, series_table.c.metric == metric)
    ).scalars())
    order = _ordered_layers(conn, run_id, names)
    if not order:
        return {"layers": [], "steps": [], "values": []}
    scalar = records.c.array.is_(None)
    steps = evenly(_steps(conn, [*_scalar_filter(run_id, order[0], topic, metric, phase), scalar]), max_steps)
    column = {s: i for i, s in enumerate(steps)}
    grid: dict[str, list[float | None]] = {name: [None] * len(steps) for name in order}
    query = (select(records.c.layer, records.c.step, records.c.value)
             .where(records.c.run_id == run_id, records.c.layer.in_(order), records.c.topic == topic,
                    records.c.metric == metric, records.c.phase == phase, records.c.step.in_(steps), scalar)
             .order_by(records.c.id))
    for name, step, value in conn.execute(query) if steps else ():
        grid[name][column[int(step)]] = None if value is None else float(value)  # the last write of a step wins
    return {"layers": order, "steps": steps, "values": [grid[name] for name in order]}


def histograms(
    conn: Connection, run_id: int, layer: str, topic: str, phase: str, max_steps: int,
) -> dict[str, list[Any]]:
    """The ``histogram`` counts of one layer's topic over training, at most ``max_steps`` steps.

    Returns ``{"steps", "edges", "counts"}``: the steps picked evenly over the run, the bin edges
    (the latest ``histogram_edges`` record; the metric fixes them once), one list of counts per step.
    """
    counts_where = [*_scalar_filter(run_id, layer, topic, "histogram", phase), records.c.array.is_not(None)]
    steps = evenly(_steps(conn, counts_where), max_steps)
    edges_where = [*_scalar_filter(run_id, layer, topic, "histogram_edges", phase), records.c.array.is_not(None)]
    edges_blob = conn.execute(
        select(records.c.array).where(*edges_where).order_by(records.c.step.desc(), records.c.id.desc()).limit(1)
    ).scalar()
    edges = [] if edges_blob is None else np.frombuffer(edges_blob, dtype=_FLOAT64).tolist()
    by_step: dict[int, list[float]] = {}
    if steps:
        query = select(records.c.step, records.c.array).where(*counts_where, records.c.step.in_(steps))
        for step, blob in conn.execute(query.order_by(records.c.id)):
            by_step[int(step)] = np.frombuffer(blob, dtype=_FLOAT64).tolist()
    return {"steps": steps, "edges": edges, "counts": [by_step[s] for s in steps]}
