"""A tiny third-party metric: the largest absolute value of a tensor."""

from __future__ import annotations

from typing import Any

import numpy as np

from sonde.metrics import Capture, Metric


class PeakAbs(Metric):
    name = "peak_abs"
    topics = ("activations", "weights")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("peak", default=-np.inf, reduce="max")

    def update(self, capture: Capture) -> None:
        self.stage("peak", capture.tensor.detach().abs().max())

    def compute(self) -> dict[str, float]:
        return {"peak_abs": float(self.state["peak"])}
