"""Representational similarity on a fixed probe set: ``cka``, ``svcca`` and the ``cka_matrix``.

These metrics read the activations of the probe set passed to ``sonde.probe(...,
probe_set=(inputs, labels))`` (labels optional here), which the probe evaluates with gradients
off, the model in eval mode, in chunks of ``TorchProbe.probe_batch_size`` (256) rows, at the
steps the metric's schedule accepts (``compute_every``, default every 100 steps; ``every``
if ``compute_every`` is not given). Training batches never reach them.

* ``cka``: minibatch linear CKA (Nguyen et al. 2021) of a layer's probe-set activations now
  against the same layer at a reference step: ``reference="first"`` (the first evaluated step,
  default: how far the layer has moved since; emitted as ``cka``) or ``"previous"`` (the
  previous evaluated step: how fast it still moves; emitted as ``cka_previous``). The unbiased
  HSIC of each chunk's Gram matrices is averaged over the chunks. The first evaluated step is
  compared with itself (1.0).
* ``svcca``: SVCCA (Raghu et al. 2017, ``keep=0.99``) of the same pair, on all probe-set rows
  (``svcca`` / ``svcca_previous``).
* ``cka_matrix``: minibatch CKA between every pair of probed layers at the same step. Record
  shape: one scalar Record per ordered layer pair, ``layer=a``, ``topic="activations"``,
  ``metric="cka_matrix:" + b`` (both triangles and the diagonal, which is 1), so that the row of
  layer ``a`` at step k is every metric starting with ``cka_matrix:`` of that layer, and a
  dashboard draws the heatmap by splitting the metric name at the first ``:``; rows and
  columns come in forward order. Each pair is also a time series.

Features per sample: ``pool="flatten"`` (default for CKA: the whole activation, which for CKA
costs nothing extra since only the n×n Gram matrix is kept) or ``pool="mean"`` (default for
SVCCA: tensors with more than two dimensions are averaged over every dimension after the
second, i.e. conv maps (N, C, H, W) are channel-pooled to (N, C); for sequence outputs
(N, T, d) pass ``pool="flatten"``). Gram matrices are formed on the tensor's device in float64;
all the rest runs on the probe's background worker.

Example:
    >>> import sonde, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> probe_set = torch.randn(64, 4)
    >>> with sonde.probe(model, store=None, metrics=[CKA(compute_every=1)], probe_set=probe_set) as p:
    ...     _ = model(torch.randn(8, 4))
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from sonde.errors import ConfigError
from sonde.functional.similarity import MinibatchCKA, svcca
from sonde.metrics.base import Capture, Metric
from sonde.schedules import Schedule

__all__ = ["CKA", "SVCCA", "CKAMatrix", "probe_features"]

POOLS = ("flatten", "mean")
REFERENCES = ("first", "previous")


def probe_features(tensor: torch.Tensor, pool: str) -> torch.Tensor:
    """Per-sample features (N, p) of a batch of activations: flattened, or averaged over dims ≥ 2.

    Example:
        >>> probe_features(torch.ones(2, 3, 4, 4), "mean").shape
        torch.Size([2, 3])
    """
    t = tensor.detach()
    if pool == "mean" and t.ndim > 2:
        return t.mean(dim=tuple(range(2, t.ndim)))
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # not -1: a batch may have 0 rows


def _gram(tensor: torch.Tensor, pool: str) -> torch.Tensor:
    feats = probe_features(tensor, pool).double()
    return feats @ feats.T


def _keep_current(current: Any, value: Any) -> Any:
    return current


class _ProbeSetMetric(Metric):
    """Base of metrics computed on probe-set activations (routed to them only by the probe)."""

    topics = ("activations",)
    offload: ClassVar[bool] = True
    #: "required": needs ``probe_set=``; "optional": uses it when given (task scores).
    probe_set: ClassVar[str | None] = "required"
    default_compute_every: ClassVar[int] = 100

    def __init__(
        self,
        *,
        pool: str = "flatten",
        every: int | Schedule | None = None,
        compute_every: int | Schedule | None = None,
        reset: str = "compute",
    ) -> None:
        if pool not in POOLS:
            raise ConfigError(f"pool= expects one of {POOLS}, got {pool!r}")
        if every is None and compute_every is None:
            compute_every = self.default_compute_every
        super().__init__(every=every, compute_every=compute_every, reset=reset)
        self.pool = pool
        self.layer = ""
        self.step = -1


class _AgainstReference(_ProbeSetMetric):
    """A layer's probe-set representation now against the same layer at a reference step."""

    def __init__(self, *, reference: str = "first", **kwargs: Any) -> None:
        if reference not in REFERENCES:
            raise ConfigError(f"reference= expects one of {REFERENCES}, got {reference!r}")
        super().__init__(**kwargs)
        self.reference = reference
        self.output = self.name if reference == "first" else f"{self.name}_previous"
        self.reference_step = -1
        self._reference: list[np.ndarray] | None = None
        self.add_state("chunks", default=None, reduce=_keep_current)
        self.add_state("reference_chunks", default=None, reduce=_keep_current)

    def emits(self) -> tuple[str, ...]:
        return (self.output,)

    def chunk(self, capture: Capture) -> torch.Tensor:
        raise NotImplementedError

    def update(self, capture: Capture) -> None:
        self.layer, self.step = capture.layer, capture.step
        if capture.numel() == 0:
            return  # an empty batch holds no sample to compare
        self.stage("chunks", self.chunk(capture))

    def absorb_staged(self, host: dict[int, np.ndarray]) -> None:
        """Gather this pass's chunks and pair them with the reference (on the training thread)."""
        chunks = [np.asarray(host[id(t)], dtype=np.float64) for _, t in self.staged]
        self.staged.clear()
        if not chunks:
            return
        self.state["chunks"] = chunks
        self.state["reference_chunks"] = self._reference if self._reference is not None else chunks
        if self._reference is None or self.reference == "previous":
            self._reference = chunks
            self.reference_step = self.step


class CKA(_AgainstReference):
    """Minibatch linear CKA of a layer's probe-set activations against a reference step.

    Args:
        reference: ``"first"`` (the first evaluated step; emits ``cka``) or ``"previous"`` (the
            previous one; emits ``cka_previous``).
        **kwargs: ``pool=`` ``"flatten"`` (default) or ``"mean"`` (average over dims ≥ 2, channel
            pooling); ``every=``, ``compute_every=`` and ``reset=`` as for every metric: the probe
            set is evaluated at the steps ``compute_every`` (default 100) accepts.

    Example:
        ``sonde.probe(model, metrics=[sonde.metrics.CKA(reference="previous")], probe_set=(x, y))``
    """

    name = "cka"

    def chunk(self, capture: Capture) -> torch.Tensor:
        return capture.cached(f"gram:{self.pool}", lambda t: _gram(t, self.pool))

    def compute(self) -> dict[str, Any]:
        now, then = self.state["chunks"], self.state["reference_chunks"]
        if now is None:
            return {}
        if len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
            raise ValueError("the probe set changed between the reference step and now; CKA pairs the same samples")
        acc = MinibatchCKA()
        for k, l in zip(now, then):  # noqa: E741
            acc.update_grams(k, l)
        return {self.output: acc.value()}


class SVCCA(_AgainstReference):
    """SVCCA of a layer's probe-set activations against a reference step (all rows at once).

    Args:
        keep: share of variance the kept singular directions explain (0.99).
        pool: ``"mean"`` (default: conv maps channel-pooled) or ``"flatten"``.
        **kwargs: ``reference=`` ``"first"`` or ``"previous"``; ``every=``, ``compute_every=`` and
            ``reset=`` as for every metric.

    Use many more probe-set samples than kept directions (SVCCA of n samples in ≥ n dimensions
    is trivially 1).

    Example:
        ``sonde.probe(model, metrics=[sonde.metrics.SVCCA(keep=0.99)], probe_set=x)``
    """

    name = "svcca"
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"keep": (0.0, 1.0)}

    def __init__(self, *, keep: float = 0.99, pool: str = "mean", **kwargs: Any) -> None:
        self.check_settings(keep=keep)
        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"keep= expects a share of variance in (0, 1], got {keep!r}")
        super().__init__(pool=pool, **kwargs)
        self.keep = keep

    def chunk(self, capture: Capture) -> torch.Tensor:
        return probe_features(capture.tensor, self.pool).double()

    def compute(self) -> dict[str, Any]:
        now, then = self.state["chunks"], self.state["reference_chunks"]
        if now is None:
            return {}
        x, y = np.concatenate(now), np.concatenate(then)
        if x.shape[0] != y.shape[0]:
            raise ValueError("the probe set changed between the reference step and now; SVCCA pairs the same samples")
        return {self.output: svcca(x, y, keep=self.keep)}


class _PassGrams:
    """The Gram matrices of every layer for one probe-set pass, and (once one row asked for it)
    the whole CKA matrix, computed in one go and shared by the rows of that pass."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.grams: dict[str, list[np.ndarray]] = {}
        self.layers: list[str] = []
        self.matrix: np.ndarray | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _PassGrams:
        return self  # written once per pass, then only read

    def cka(self) -> tuple[list[str], np.ndarray]:
        if self.matrix is None:
            # Layers that ran on every chunk of the pass (all of them, unless a layer was skipped).
            shapes = {name: [g.shape for g in grams] for name, grams in self.grams.items()}
            common = max(shapes.values(), key=lambda s: sum(1 for v in shapes.values() if v == s))
            layers = [name for name in self.grams if shapes[name] == common]
            acc = MinibatchCKA()
            for c in range(len(common)):
                acc.update_grams(*(self.grams[name][c] for name in layers))
            self.layers, self.matrix = layers, acc.matrix()
        return self.layers, self.matrix


class _SharedPass:
    """The current pass's :class:`_PassGrams`, shared by all clones of one ``CKAMatrix`` template
    (copying returns the same object)."""

    def __init__(self) -> None:
        self.current = _PassGrams(-1)

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedPass:
        return self

    def __copy__(self) -> _SharedPass:
        return self


class CKAMatrix(_ProbeSetMetric):
    """Minibatch linear CKA between every pair of probed layers on the probe set.

    Emits one scalar per ordered pair: layer ``a`` gets ``cka_matrix:<b>`` for every layer ``b``
    (itself included, 1.0), forward order; see the module docstring for the heatmap layout.
    Cost per evaluation: one n_chunk × n_chunk Gram per layer and chunk on the device, then one
    (L × n_chunk²) @ (n_chunk² × L) product per chunk on the worker for the whole matrix.

    Example:
        ``sonde.probe(model, metrics=["cka_matrix"], probe_set=x)``
    """

    name = "cka_matrix"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared = _SharedPass()
        self.add_state("all", default=None, reduce=_keep_current)

    def emits(self) -> tuple[str, ...]:
        return ("cka_matrix:*",)

    def update(self, capture: Capture) -> None:
        self.layer, self.step = capture.layer, capture.step
        if capture.numel() == 0:
            return  # an empty batch holds no sample to compare
        self.stage("all", capture.cached(f"gram:{self.pool}", lambda t: _gram(t, self.pool)))

    def absorb_staged(self, host: dict[int, np.ndarray]) -> None:
        chunks = [np.asarray(host[id(t)], dtype=np.float64) for _, t in self.staged]
        self.staged.clear()
        if not chunks:
            return
        if self.shared.current.step != self.step:  # a new pass; the old one stays with its snapshots
            self.shared.current = _PassGrams(self.step)
        self.shared.current.grams[self.layer] = chunks
        self.state["all"] = self.shared.current  # complete once every layer of the pass is absorbed

    def compute(self) -> dict[str, Any]:
        grams: _PassGrams | None = self.state["all"]
        if grams is None or self.layer not in grams.grams:
            return {}
        layers, matrix = grams.cka()
        if self.layer not in layers:
            return {}
        row = matrix[layers.index(self.layer)]
        return {f"cka_matrix:{other}": float(value) for other, value in zip(layers, row)}
