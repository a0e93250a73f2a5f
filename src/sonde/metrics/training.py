"""Per-step training scores: ``loss`` as logged and ``train_accuracy``.

Example:
    >>> import torch
    >>> from sonde.metrics.base import Capture
    >>> m = TrainAccuracy()
    >>> m.update(Capture(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), labels=torch.tensor([0, 0])))
    >>> m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    >>> m.compute()
    {'train_accuracy': 0.5}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sonde import functional as F
from sonde.metrics.base import Capture, Metric

__all__ = ["Loss", "TrainAccuracy"]


class Loss(Metric):
    """The loss as logged with ``Probe.log(loss=...)``; several logs in one step are averaged."""

    name = "loss"
    topics = ("loss",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=0.0, reduce="sum")
        self.add_state("count", default=0.0, reduce="sum")

    def update(self, capture: Capture) -> None:
        self.stage("total", capture.tensor.detach().reshape(-1).double().mean())
        self.state["count"] += 1.0

    def compute(self) -> dict[str, Any]:
        if not self.state["count"]:
            return {}
        return {"loss": float(self.state["total"] / self.state["count"])}


class TrainAccuracy(Metric):
    """Fraction of logged labels the logged outputs predict (argmax), over all the step's batches."""

    name = "train_accuracy"
    topics = ("outputs",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", default=np.zeros(2), reduce="sum")

    def update(self, capture: Capture) -> None:
        if capture.labels is not None:
            self.stage("counts", F.accuracy_counts(capture.tensor, capture.labels))

    def compute(self) -> dict[str, Any]:
        correct, total = self.state["counts"]
        if not total:
            return {}
        return {"train_accuracy": float(correct / total)}
