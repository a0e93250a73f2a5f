"""``spectral_norm`` and ``condition_number`` of every weight matrix of a layer.

On the training thread the metric only copies the weight, as step k's forward used it (the
``weights`` topic is captured before the optimizer step, and the copy keeps it from being
overwritten by that step); the singular values are computed on the probe's background worker.

``spectral_norm`` warm-starts its block power iteration from the basis found at the previous
value, per weight matrix, and iterates until the relative change is below ``tol`` (1e-5 by
default: on a random 1024×1024 matrix, a single vector stopped at a relative change of 1e-4 was
5e-3 short of σ₁; a block of 8 with 1e-5 stays within 1e-4). A layer with several weight matrices
(an LSTM's ``weight_ih_l0`` and ``weight_hh_l0``) reports the largest σ₁ of them;
``condition_number`` the largest σmax/σmin.

Example:
    >>> import torch
    >>> from sonde.metrics.base import Capture
    >>> m = SpectralNorm()
    >>> m.update(Capture(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), topic="weights"))
    >>> m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    >>> round(m.compute()["spectral_norm"], 6)
    4.0
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from sonde.functional.spectral import as_matrix, condition_number, top_singular_value
from sonde.metrics.base import Capture, Metric
from sonde.schedules import Schedule

__all__ = ["ConditionNumber", "SpectralNorm"]


def _latest(_older: Any, newer: Any) -> Any:
    return newer


class SpectralNorm(Metric):
    """Largest singular value σ₁ of each weight read as (out_features, −1).

    Args:
        tol: stop when σ₁ changes by less than this, relatively, between two iterations.
        max_iter: iteration cap per value (a cold start on a 1024×1024 weight needs about 50).
        block: vectors iterated together (convergence at (σ_{block+1}/σ₁)² per iteration).
        compute_every: steps at which a value is computed (default: every recorded step).
        every: when the weight is copied (default: the probe's ``every=``).

    Example:
        ``sonde.probe(model, optimizer=opt, metrics=["spectral_norm"])``
    """

    name = "spectral_norm"
    topics: ClassVar[tuple[str, ...]] = ("weights",)
    offload: ClassVar[bool] = True
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"tol": (1e-12, 1.0), "max_iter": (1, 10_000), "block": (1, 256)}

    def __init__(
        self,
        *,
        tol: float = 1e-5,
        max_iter: int = 500,
        block: int = 8,
        compute_every: int | Schedule | None = None,
        reset: str = "compute",
        every: int | Schedule | None = None,
    ) -> None:
        self.check_settings(tol=tol, max_iter=max_iter, block=block)
        super().__init__(every=every, compute_every=compute_every, reset=reset)
        self.tol, self.max_iter, self.block = tol, max_iter, block
        # Per weight matrix of the layer, the basis of the previous value. Mutated in place by the
        # worker's compute (a snapshot shares this dict), one compute at a time per instance.
        self.warm: dict[str, np.ndarray] = {}
        self._step: int | None = None
        self._index = 0

    def update(self, capture: Capture) -> None:
        if not self.due(capture.step) or capture.numel() == 0:
            return  # the weight is read only at the steps that compute a value; an empty one has no σ
        if capture.step != self._step:
            self._step, self._index = capture.step, 0
        name = f"w{self._index}"
        self._index += 1
        if name not in self.state:
            self.add_state(name, default=None, reduce=_latest)  # a later step replaces the weight
        # A float64 copy now: the optimizer step overwrites the parameter before the flush.
        self.stage(name, capture.tensor.detach().to(torch.float64, copy=True))

    def _matrices(self) -> list[tuple[str, np.ndarray]]:
        return [(name, as_matrix(value)) for name, value in self.state.items() if value is not None]

    def compute(self) -> dict[str, Any]:
        norms = []
        for name, matrix in self._matrices():
            sigma, basis, _ = top_singular_value(matrix, self.warm.get(name), tol=self.tol,
                                                 max_iter=self.max_iter, block=self.block)
            self.warm[name] = basis
            norms.append(sigma)
        return {"spectral_norm": max(norms)} if norms else {}


class ConditionNumber(SpectralNorm):
    """σmax/σmin of each weight read as (out_features, −1), σmin the smallest of its min(out, in)
    singular values, from a full SVD off the training thread: O(out·in·min(out, in)) per value
    (about a second for 1024×1024 on one core), hence every 10th step by default.

    Example:
        ``sonde.probe(model, optimizer=opt, metrics=[sonde.metrics.ConditionNumber(compute_every=100)])``
    """

    name = "condition_number"

    def __init__(self, *, compute_every: int | Schedule | None = 10, reset: str = "compute",
                 every: int | Schedule | None = None) -> None:
        super().__init__(compute_every=compute_every, reset=reset, every=every)

    def compute(self) -> dict[str, Any]:
        values = [condition_number(matrix) for _, matrix in self._matrices()]
        return {"condition_number": max(values)} if values else {}
