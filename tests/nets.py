"""Small models the tests share (imported as ``from nets import Block, train_toy``).

This lives outside ``conftest.py`` for the same reason as ``collect.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sonde

__all__ = ["Block", "train_toy"]


def train_toy(steps: int, *, features: int = 3, hidden: int = 4,
              during: Callable[[int, Any], None] | None = None, **probe_kwargs: Any) -> None:
    """Train Linear(features, hidden) → ReLU → Linear(hidden, 2) for ``steps`` SGD steps under
    ``sonde.probe(model, optimizer=opt, **probe_kwargs)``, logging the loss; ``during(step, probe)``
    runs after each step."""
    model = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, optimizer=opt, **probe_kwargs) as p:
        for step in range(steps):
            loss = model(torch.randn(8, features)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
            if during is not None:
                during(step, p)


class Block(nn.Module):
    """A residual block: conv-bn-relu, conv-bn, plus the input, relu (ResNet's basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
