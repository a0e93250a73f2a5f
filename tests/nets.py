"""Small models the tests share (imported as ``from nets import Block``).

This lives outside ``conftest.py`` for the same reason as ``collect.py``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Block"]


class Block(nn.Module):
    """A residual block: conv-bn-relu, conv-bn, plus the input, relu (ResNet's basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
