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
* Whatever the data holds, a heatmap or a histogram view holds at most :data:`MAX_CELLS` values:
  a heatmap at most :data:`MAX_LAYERS` rows, a histogram at most :data:`MAX_BINS` bins per step
  (finer ones are merged, adjacent bins summed), and fewer step columns than asked for where the
  rows or bins are many. Such an answer says ``"truncated": True``; every answer carries the flag.

Example:
    >>> with engine.connect() as conn:                                   # doctest: +SKIP
    ...     series(conn, run_id, "fc1", "weights", "norm", "train", 2000, None, None)["max"][:3]
    [1.5, 1.52, 1.55]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, Integer, func, literal_column, select

from sonde.store.schema import layers, records
from sonde.store.schema import series as series_table

__all__ = ["MAX_BINS", "MAX_CELLS", "MAX_LAYERS", "evenly", "heatmap", "histograms", "series"]

_FLOAT64 = np.dtype("<f8")
#: The most values (rows × step columns, or steps × bins) one heatmap or histogram view holds.
MAX_CELLS = 500_000
#: The most layers (rows) one heatmap holds; the rest, last in forward order, are left out.
MAX_LAYERS = 10_000
#: The most bins per step a histogram view holds; finer histograms are merged (the Histogram metric's own bound).
MAX_BINS = 4096


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


def _series_id(conn: Connection, run_id: int, phase: str, layer: str, topic: str, metric: str) -> int | None:
    query = select(series_table.c.id).where(
        series_table.c.run_id == run_id, series_table.c.phase == phase, series_table.c.layer == layer,
        series_table.c.topic == topic, series_table.c.metric == metric)
    found = conn.execute(query).scalar()
    return None if found is None else int(found)


def series(
    conn: Connection, run_id: int, layer: str, topic: str, metric: str, phase: str,
    max_points: int, start: int | None, end: int | None,
) -> dict[str, list[Any]]:
    """One metric of one layer over steps ``start..end`` (inclusive), at most ``max_points`` buckets.

    Returns ``{"step", "value", "min", "max"}`` lists of equal length: the bucket's first step,
    its mean, minimum and maximum (all three the raw value when a bucket holds one record).
    NaN values are stored as NULL and skipped; a bucket of only NaN gives None.
    """
    out: dict[str, list[Any]] = {"step": [], "value": [], "min": [], "max": []}
    sid = _series_id(conn, run_id, phase, layer, topic, metric)
    if sid is None:
        return out
    step, value = records.c.step, records.c.value
    where = [records.c.series_id == sid]
    if start is not None:
        where.append(step >= start)
    if end is not None:
        where.append(step <= end)
    # Two statements, not one: each is a single seek of the (series_id, step) index.
    lo = conn.execute(select(func.min(step)).where(*where)).scalar()
    hi = conn.execute(select(func.max(step)).where(*where)).scalar()
    if lo is None or hi is None:
        return out
    width = max(1, -(-(int(hi) - int(lo) + 1) // max_points))
    # Literal integers, not bound parameters: PostgreSQL matches GROUP BY expressions textually,
    # and integer division truncates alike on SQLite and PostgreSQL (step - lo is never negative).
    bucket = (step - literal_column(str(int(lo)), Integer)) // literal_column(str(width), Integer)
    query = (select(func.min(step), func.avg(value), func.min(value), func.max(value))
             .where(*where).group_by(bucket).order_by(func.min(step)))
    for first, mean, low, high in conn.execute(query):
        out["step"].append(int(first))
        out["value"].append(None if mean is None else float(mean))
        out["min"].append(None if low is None else float(low))
        out["max"].append(None if high is None else float(high))
    return out


def _steps(conn: Connection, sid: int, start: int | None = None, end: int | None = None) -> list[int]:
    where = [records.c.series_id == sid]
    if start is not None:
        where.append(records.c.step >= start)
    if end is not None:
        where.append(records.c.step <= end)
    query = select(records.c.step).where(*where).distinct().order_by(records.c.step)
    return [int(s) for s in conn.execute(query).scalars()]


def heatmap(
    conn: Connection, run_id: int, topic: str, metric: str, phase: str, max_steps: int,
    start: int | None = None, end: int | None = None,
) -> dict[str, Any]:
    """One metric of one topic for every layer that has it: layers as rows, steps as columns.

    The columns are at most ``max_steps`` recorded steps, picked evenly over the run or over the
    steps ``start..end`` (inclusive; None is open) when given (the steps of the first layer in
    forward order); each cell is that layer's value at that step, None where the layer has no
    value there or it is NaN.
    """
    ids = {str(layer): int(i) for i, layer in conn.execute(
        select(series_table.c.id, series_table.c.layer).where(
            series_table.c.run_id == run_id, series_table.c.phase == phase,
            series_table.c.topic == topic, series_table.c.metric == metric))}
    order = _ordered_layers(conn, run_id, set(ids))
    if not order:
        return {"layers": [], "steps": [], "values": [], "truncated": False}
    truncated = len(order) > MAX_LAYERS
    order = order[:MAX_LAYERS]
    steps = evenly(_steps(conn, ids[order[0]], start, end), max_steps)
    columns = max(1, MAX_CELLS // len(order))
    if len(steps) > columns:
        steps, truncated = evenly(steps, columns), True
    column = {s: i for i, s in enumerate(steps)}
    row_of = {ids[name]: i for i, name in enumerate(order)}
    grid: list[list[float | None]] = [[None] * len(steps) for _ in order]
    query = (select(records.c.series_id, records.c.step, records.c.value)
             .where(records.c.series_id.in_(list(row_of)), records.c.step.in_(steps)))
    for sid, step, value in conn.execute(query) if steps else ():
        grid[row_of[int(sid)]][column[int(step)]] = None if value is None else float(value)
    return {"layers": order, "steps": steps, "values": grid, "truncated": truncated}


def histograms(
    conn: Connection, run_id: int, layer: str, topic: str, phase: str, max_steps: int,
) -> dict[str, Any]:
    """The ``histogram`` counts of one layer's topic over training, at most ``max_steps`` steps.

    Returns ``{"steps", "edges", "counts", "truncated"}``: the steps picked evenly over the run, the
    bin edges (the latest ``histogram_edges`` record; the metric fixes them once), one list of counts
    per step. Histograms of more than :data:`MAX_BINS` bins come merged to at most that many (edges
    to match), and fewer steps than ``max_steps`` come back where steps × bins would pass
    :data:`MAX_CELLS`; ``truncated`` says so.
    """
    counts_id = _series_id(conn, run_id, phase, layer, topic, "histogram")
    edges_id = _series_id(conn, run_id, phase, layer, topic, "histogram_edges")
    steps = [] if counts_id is None else evenly(_steps(conn, counts_id), max_steps)
    truncated = False
    if steps:  # the widest stored histogram of those steps, read from the blobs' lengths alone
        widest = conn.execute(select(func.max(func.length(records.c.array))).where(
            records.c.series_id == counts_id, records.c.step.in_(steps))).scalar()
        columns = max(1, MAX_CELLS // max(1, int(widest or 0) // _FLOAT64.itemsize))
        if len(steps) > columns:
            steps, truncated = evenly(steps, columns), True
    edges: list[float] = []
    if edges_id is not None:
        blob = conn.execute(select(records.c.array).where(records.c.series_id == edges_id, records.c.array.is_not(None))
                            .order_by(records.c.step.desc(), records.c.id.desc()).limit(1)).scalar()
        if blob is not None:
            edges_array = np.frombuffer(blob, dtype=_FLOAT64)
            edges = _merged_edges(edges_array, len(edges_array) - 1).tolist()
    by_step: dict[int, list[float]] = {}
    if steps:
        query = (select(records.c.step, records.c.array)
                 .where(records.c.series_id == counts_id, records.c.step.in_(steps), records.c.array.is_not(None))
                 .order_by(records.c.id))
        for step, blob in conn.execute(query):
            counts = np.frombuffer(blob, dtype=_FLOAT64)
            truncated = truncated or len(counts) > MAX_BINS
            by_step[int(step)] = _merged_counts(counts).tolist()
    return {"steps": [s for s in steps if s in by_step], "edges": edges,
            "counts": [by_step[s] for s in steps if s in by_step], "truncated": truncated}


def _merge_factor(bins: int) -> int:
    """How many adjacent bins make one so that ``bins`` bins become at most :data:`MAX_BINS`."""
    return max(1, -(-bins // MAX_BINS))


def _merged_counts(counts: np.ndarray) -> np.ndarray:
    """``counts`` with each run of :func:`_merge_factor` adjacent bins summed (the last run may be shorter)."""
    factor = _merge_factor(len(counts))
    if factor == 1:
        return counts
    return np.add.reduceat(counts, np.arange(0, len(counts), factor))


def _merged_edges(edges: np.ndarray, bins: int) -> np.ndarray:
    """The edges of :func:`_merged_counts`'s bins: every ``factor``-th edge, and the last."""
    factor = _merge_factor(bins)
    if factor == 1 or bins < 1:
        return edges
    return edges[np.r_[np.arange(0, bins, factor), bins]]


def _ordered_layers(conn: Connection, run_id: int, names: set[str]) -> list[str]:
    """``names`` in the run's forward (probe) order; layers the run did not declare come last, sorted."""
    declared = conn.execute(select(layers.c.name).where(layers.c.run_id == run_id).order_by(layers.c.position))
    order = [n for n in declared.scalars() if n in names]
    return order + sorted(names.difference(order))
