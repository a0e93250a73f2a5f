from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from sonde.records import Record
from sonde.sinks import Sink


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


@pytest.fixture
def collect() -> Collect:
    return Collect()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
