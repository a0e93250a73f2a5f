"""The in-memory sink the tests share (imported as ``from collect import Collect``).

It lives outside ``conftest.py`` because several test folders have a conftest of their own, and
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

from collections.abc import Sequence

from sonde.records import Record
from sonde.sinks import Sink

__all__ = ["Collect"]


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
