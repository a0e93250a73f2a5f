from __future__ import annotations

import pytest
import torch

from collect import Collect


@pytest.fixture
def collect() -> Collect:
    return Collect()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
