"""The layer × layer matrix query: one step of a metric recorded once per ordered layer pair.

Some metrics relate two layers rather than describe one: ``cka_matrix`` records, at a step,
one scalar per ordered pair ``(a, b)`` as layer ``a``, metric ``"cka_matrix:" + b``. This
query reads such a family back as a square matrix at one step, rows and columns in the run's
forward order, and lists the steps at which the family was recorded (for a step picker).

It reads one step's cells by the ``(series_id, step)`` index, never the whole history, so a
long run with a large matrix costs one index seek per cell shown.

Example:
    >>> with engine.connect() as conn:                                        # doctest: +SKIP
    ...     matrix(conn, run_id, "activations", "cka_matrix:", "train", None)["layers"]
    ['0', '1', '2']
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from sonde.store.queries import _ordered_layers
from sonde.store.schema import records
from sonde.store.schema import series as series_table

__all__ = ["matrix"]

#: Series ids per ``IN (...)`` list: under SQLite's and PostgreSQL's bound-parameter limits.
_CHUNK = 900


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def matrix(
    conn: Connection, run_id: int, topic: str, prefix: str, phase: str, step: int | None,
) -> dict[str, Any]:
    """The pairwise family ``prefix + b`` of ``topic`` at one step, as a square matrix.

    Returns ``{"layers", "steps", "step", "values"}``: the layers met as a row or as a column in
    forward order (both axes), every step where the family's diagonal was recorded (or, when
    it has no diagonal, any of its cells), the step shown (``step`` if given and recorded,
    else the latest; None when nothing was recorded) and ``values[i][j]``, the value of row
    layer ``layers[i]`` against ``layers[j]`` at that step (None where missing or NaN).
    """
    empty: dict[str, Any] = {"layers": [], "steps": [], "step": None, "values": []}
    cells: dict[int, tuple[str, str]] = {}
    for sid, layer, metric in conn.execute(
            select(series_table.c.id, series_table.c.layer, series_table.c.metric).where(
                series_table.c.run_id == run_id, series_table.c.phase == phase, series_table.c.topic == topic)):
        if str(metric).startswith(prefix) and len(metric) > len(prefix):
            cells[int(sid)] = (str(layer), str(metric)[len(prefix):])
    if not cells:
        return empty
    order = _ordered_layers(conn, run_id, {a for a, _ in cells.values()} | {b for _, b in cells.values()})
    # Steps from the diagonal (L series, always written by a full pass), not from all L² series.
    diagonal = [sid for sid, (a, b) in cells.items() if a == b] or list(cells)
    steps: set[int] = set()
    for part in _chunks(diagonal):
        query = select(records.c.step).where(records.c.series_id.in_(part)).distinct()
        steps.update(int(s) for s in conn.execute(query).scalars())
    ordered = sorted(steps)
    if not ordered:
        return empty
    shown = step if step in steps else ordered[-1]
    index = {name: i for i, name in enumerate(order)}
    values: list[list[float | None]] = [[None] * len(order) for _ in order]
    for part in _chunks(list(cells)):
        query = select(records.c.series_id, records.c.value).where(
            records.c.series_id.in_(part), records.c.step == shown, records.c.array.is_(None)).order_by(records.c.id)
        for sid, value in conn.execute(query):
            a, b = cells[int(sid)]
            values[index[a]][index[b]] = None if value is None else float(value)
    return {"layers": order, "steps": ordered, "step": shown, "values": values}
