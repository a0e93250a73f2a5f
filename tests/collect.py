"""The in-memory sink the tests share (imported as ``from collect import Collect``).

It lives outside ``conftest.py`` because several test folders have a conftest of their own, and
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sonde.records import Record
from sonde.sinks import Sink
from sonde.store import Store

__all__ = ["Collect", "key", "stored"]


class Collect(Sink):
    """A sink that keeps every Record in memory, for tests."""

    name = "collect"

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)

    def find(self, **where: object) -> list[Record]:
        return [r for r in self.records if all(getattr(r, k) == v for k, v in where.items())]

    def value(self, **where: object) -> float:
        found = self.find(**where)
        assert len(found) == 1, f"expected one record for {where}, got {len(found)}"
        return found[0].value  # type: ignore[return-value]


def key(record: Record) -> tuple[Any, ...]:
    """A Record as a comparable tuple: step, phase, layer, topic, metric, value (rounded to 9 digits)."""
    value = record.value
    rounded = tuple(np.round(value, 9)) if isinstance(value, np.ndarray) else round(float(value), 9)
    return (int(record.step), record.phase, record.layer, record.topic, record.metric, rounded)


def stored(store: Store, run: str) -> list[tuple[Any, ...]]:
    """``key`` of every row ``store`` holds for ``run``, scalar rows and array rows alike."""
    return [key(Record(run, *row[1:])) for arrays in (False, True)
            for row in store.load(run, arrays=arrays).itertuples(index=False, name=None)]
