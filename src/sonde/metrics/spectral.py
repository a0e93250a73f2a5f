"""``spectral_norm`` and ``condition_number`` of every weight matrix of a layer.

On the training thread the metric only copies the weight, as step k's forward used it (the
``weights`` topic is captured before the optimizer step, and the copy keeps it from being
overwritten by that step); the singular values are computed on the probe's background worker.

Where the weight lives on a CUDA GPU, the copy stays there (float32, or float64 for a float64
weight) and the worker iterates on the GPU, on the stream the copy was made on, reading back
only a block's 8 × 8 Gram matrix per iteration through an event
(:func:`~sonde.functional.spectral.top_singular_value_torch`): no weight crosses to the host and
the training thread never waits. Elsewhere the float64 copy reaches the host with the step's
other partials and numpy iterates there. ``where=`` chooses explicitly.

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

from sonde.errors import ConfigError
from sonde.functional.spectral import as_matrix, condition_number, top_singular_value, top_singular_value_torch
from sonde.metrics.base import Capture, Metric
from sonde.metrics.transfer import on_stream, read_back
from sonde.schedules import Schedule

__all__ = ["ConditionNumber", "SpectralNorm"]


_WHERE = ("auto", "device", "host")


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
        where: ``"auto"`` (on the weight's device when it is a CUDA GPU, else on the host),
            ``"device"`` (on the weight's device, whatever it is) or ``"host"`` (numpy, float64).

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
        where: str = "auto",
    ) -> None:
        self.check_settings(tol=tol, max_iter=max_iter, block=block)
        if where not in _WHERE:
            raise ConfigError(f"{type(self).__name__}(where=) expects one of {', '.join(map(repr, _WHERE))}, "
                              f"got {where!r}")
        super().__init__(every=every, compute_every=compute_every, reset=reset)
        self.tol, self.max_iter, self.block, self.where = tol, max_iter, block, where
        # Per weight matrix of the layer, the basis of the previous value (a numpy array, or a
        # tensor on the weight's device). Mutated in place by the worker's compute (a snapshot
        # shares this dict), one compute at a time per instance.
        self.warm: dict[str, Any] = {}
        # The CUDA stream the device copies were made on: the worker iterates on it (None: the
        # current one).
        self.stream: Any = None
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
        # A copy now: the optimizer step overwrites the parameter before the worker reads it.
        weight = capture.tensor.detach()
        if self._on_device(weight):
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            if weight.device.type == "cuda":
                self.stream = torch.cuda.current_stream(weight.device)
            self.absorb(name, weight.to(dtype, copy=True))  # state on the device: no transfer
        else:
            self.stage(name, weight.to(torch.float64, copy=True))

    def _on_device(self, weight: torch.Tensor) -> bool:
        return self.where == "device" or (self.where == "auto" and weight.device.type == "cuda")

    def _matrices(self) -> list[tuple[str, np.ndarray]]:
        """Every weight as a float64 host matrix (a copy kept on a GPU read back here, on the worker)."""
        return [(name, as_matrix(read_back(value, self.stream) if isinstance(value, torch.Tensor) else value))
                for name, value in self.state.items() if value is not None]

    def compute(self) -> dict[str, Any]:
        norms = []
        with on_stream(self.stream):
            for name, value in self.state.items():
                if value is None:
                    continue
                warm = self.warm.get(name)
                basis: Any
                if isinstance(value, torch.Tensor):  # kept on its device: iterate there
                    matrix = value.reshape(value.shape[0], -1) if value.ndim > 1 else value.reshape(-1, 1)
                    sigma, basis, _ = top_singular_value_torch(
                        matrix, warm if isinstance(warm, torch.Tensor) else None, tol=self.tol,
                        max_iter=self.max_iter, block=self.block, read=read_back)
                else:
                    sigma, basis, _ = top_singular_value(
                        as_matrix(value), warm if isinstance(warm, np.ndarray) else None, tol=self.tol,
                        max_iter=self.max_iter, block=self.block)
                self.warm[name] = basis
                norms.append(sigma)
        return {"spectral_norm": max(norms)} if norms else {}


class ConditionNumber(SpectralNorm):
    """σmax/σmin of each weight read as (out_features, −1), σmin the smallest of its min(out, in)
    singular values, from a full SVD off the training thread: O(out·in·min(out, in)) per value
    (about a second for 1024×1024 on one core), hence every 10th step by default. The SVD runs on
    the host; a copy kept on a GPU is read back by the worker, through an event.

    Example:
        ``sonde.probe(model, optimizer=opt, metrics=[sonde.metrics.ConditionNumber(compute_every=100)])``
    """

    name = "condition_number"

    def __init__(self, *, compute_every: int | Schedule | None = 10, reset: str = "compute",
                 every: int | Schedule | None = None, where: str = "auto") -> None:
        super().__init__(compute_every=compute_every, reset=reset, every=every, where=where)

    def compute(self) -> dict[str, Any]:
        values = [condition_number(matrix) for _, matrix in self._matrices()]
        return {"condition_number": max(values)} if values else {}
