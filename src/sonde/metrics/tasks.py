"""Task scores of a layer (Vivisect's): ``probe_f1`` and ``cluster_mi`` (+ ``cluster_ami``, ``cluster_nmi``).

Where the (activation, label) pairs come from:

* **a probe set** — ``sonde.probe(..., probe_set=(inputs, labels))``: at the steps
  ``compute_every`` accepts (default every 100) the probe evaluates the whole probe set (no
  grad, eval mode) and the score is computed on all of its rows;
* **otherwise, training batches** — log the labels of each batch after its forward pass,
  ``p.log(labels=y)``: at every recorded step the activations of the step's batches are paired
  with the labels logged in the same step (the i-th forward with the i-th ``log``), and a uniform
  reservoir sample of at most ``samples`` rows (default 2000) is kept per layer; the score at a
  computed step covers the batches since the previous value (``reset="compute"``).

Labels shaped ``(B,)`` give one row per sample (activations flattened, or channel-pooled with
``pool="mean"``); labels shaped like the activations' leading dimensions (``(B, T)`` tokens of
a ``(B, T, d)`` output) give one row per position. Labels < 0 (padding) are left out. The fit
(logistic regression, k-means) runs on the probe's background worker; the training thread only
copies the sampled rows off the device.

Example:
    >>> import sonde, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(64, 4), torch.arange(64) % 2
    >>> with sonde.probe(model, store=None, metrics=[ProbeF1(compute_every=1)], probe_set=(x, y)) as p:
    ...     _ = model(x[:8])
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch

from sonde.errors import ConfigError
from sonde.functional.tasks import cluster_mi, probe_f1, task_samples
from sonde.metrics.base import Capture
from sonde.metrics.similarity import POOLS, _ProbeSetMetric
from sonde.schedules import Schedule

__all__ = ["ClusterMI", "ProbeF1", "Reservoir", "StepLabels"]

log = logging.getLogger("sonde")


class StepLabels(list):  # type: ignore[type-arg]
    """Labels logged with ``p.log(labels=...)`` in the current train step, shared by the probe
    and every clone of a task metric (copying returns the same list)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> StepLabels:
        return self

    def __copy__(self) -> StepLabels:
        return self


class Reservoir:
    """A uniform sample of at most ``size`` rows (None: keep all) of the rows offered so far.

    Example:
        >>> r = Reservoir(3)
        >>> r.offer(np.arange(10.0)[:, None], np.arange(10), np.random.default_rng(0))
        >>> r.rows.shape, r.seen
        ((3, 1), 10)
    """

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.rows: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.seen = 0

    def slots(self, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """For m new rows: which of them to keep and where (Algorithm R, vectorised).

        Returns (indices among the new rows, reservoir slots); a slot ≥ current length appends.
        """
        t = self.seen + np.arange(m)
        if self.size is None:
            return np.arange(m), t
        slot = np.where(t < self.size, t, rng.integers(0, np.maximum(t + 1, 1)))
        chosen = np.flatnonzero(slot < self.size)
        return chosen, slot[chosen]

    def offer(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        idx, slot = self.slots(len(rows), rng)
        self.place(rows[idx], labels[idx], slot, len(rows))

    def place(self, rows: np.ndarray, labels: np.ndarray, slot: np.ndarray, offered: int) -> None:
        """Write chosen rows into their slots (later duplicates win, as sequential sampling)."""
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), dtype=np.float64)
            self.labels = np.empty(0, dtype=np.int64)
        assert self.labels is not None
        if rows.shape[1] != self.rows.shape[1]:
            raise ValueError(f"activation width changed from {self.rows.shape[1]} to {rows.shape[1]} features")
        grow = int(slot.max()) + 1 - len(self.rows) if len(slot) else 0
        if grow > 0:
            self.rows = np.concatenate([self.rows, np.empty((grow, rows.shape[1]))])
            self.labels = np.concatenate([self.labels, np.empty(grow, dtype=np.int64)])
        self.rows[slot] = rows
        self.labels[slot] = labels
        self.seen += offered

    def merged(self, other: Reservoir) -> Reservoir:
        """A sample of both (rows weighted by how many rows each stood for)."""
        if other.rows is None:
            return self
        if self.rows is None:
            return other
        assert self.labels is not None and other.labels is not None
        rows = np.concatenate([self.rows, other.rows])
        labels = np.concatenate([self.labels, other.labels])
        weights = np.r_[np.full(len(self.rows), self.seen / len(self.rows)),
                        np.full(len(other.rows), other.seen / len(other.rows))]
        out = Reservoir(self.size)
        keep = len(rows) if self.size is None else min(self.size, len(rows))
        pick = np.random.default_rng(self.seen + other.seen).choice(len(rows), keep, replace=False,
                                                                    p=weights / weights.sum())
        out.rows, out.labels, out.seen = rows[pick], labels[pick], self.seen + other.seen
        return out


def _merge_reservoirs(current: Reservoir, value: Reservoir) -> Reservoir:
    return current.merged(value)


class _TaskMetric(_ProbeSetMetric):
    """Shared machinery: pairing activations with labels, the reservoir, the offloaded fit."""

    probe_set: ClassVar[str | None] = "optional"
    uses_step_labels: ClassVar[bool] = True
    min_rows: ClassVar[int] = 8
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"samples": (8, 100_000), "seed": (0, 2**32 - 1)}

    def __init__(
        self,
        *,
        samples: int = 2000,
        pool: str = "flatten",
        seed: int = 0,
        every: int | Schedule | None = None,
        compute_every: int | Schedule | None = None,
        reset: str = "compute",
    ) -> None:
        if pool not in POOLS:
            raise ConfigError(f"pool= expects one of {POOLS}, got {pool!r}")
        self.check_settings(samples=samples, seed=seed)
        super().__init__(pool=pool, every=every, compute_every=compute_every, reset=reset)
        self.samples = samples
        self.seed = seed
        self.step_labels: StepLabels | None = None  # set by the probe (training-batch mode)
        self.rng = np.random.default_rng(seed)
        self.add_state("reservoir", default=None, reduce=_merge_reservoirs)
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._warned = False

    def update(self, capture: Capture) -> None:
        self.layer, self.step = capture.layer, capture.step
        if capture.labels is not None:  # probe-set pass: labels come with the chunk
            self._pending.append((capture.tensor.detach(), capture.labels))
        elif capture.phase == "train" and self.step_labels is not None:
            # The labels are logged after the forward; copy now, as later in-place ops may overwrite.
            self._pending.append((capture.tensor.detach().clone(), None))

    def absorb_staged(self, host: dict[int, np.ndarray]) -> None:
        """Pair this step's activations with their labels and sample rows (training thread)."""
        self.staged.clear()
        pending, self._pending = self._pending, []
        if not pending:
            return
        if pending[0][1] is None:
            logged = list(self.step_labels or [])
            if len(logged) != len(pending):
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "sonde: %s on layer %r: %d forward pass(es) but %d p.log(labels=...) call(s) in step %d; "
                        "log each batch's labels once, after its forward, or pass probe_set=(inputs, labels); "
                        "such steps are skipped",
                        self.name, self.layer, len(pending), len(logged), self.step,
                    )
                return
            pending = [(acts, torch.as_tensor(lab)) for (acts, _), lab in zip(pending, logged)]
            size: int | None = self.samples
        else:
            size = None  # a probe set is used whole
        reservoir = self.state["reservoir"]
        if reservoir is None:
            reservoir = self.state["reservoir"] = Reservoir(size)
        for acts, labels in pending:
            if labels is not None:
                self._offer(reservoir, acts, labels)

    def _offer(self, reservoir: Reservoir, acts: torch.Tensor, labels: torch.Tensor) -> None:
        if acts.numel() == 0 or labels.numel() == 0:
            return  # an empty batch offers no row
        lab = labels.detach()
        if lab.device != acts.device:
            lab = lab.to(acts.device)
        # Choose rows from the label tensor alone, then move only the chosen rows off the device.
        flat_labels = lab.reshape(-1).cpu().numpy()
        valid = np.flatnonzero(flat_labels >= 0)
        idx, slot = reservoir.slots(len(valid), self.rng)
        rows_idx = torch.as_tensor(valid[idx], device=acts.device)
        feats, _ = task_samples(acts[:1], lab[:1], self.pool)  # validates shapes and gives the width
        if lab.ndim == 1 and self.pool == "mean" and acts.ndim > 2:
            table = acts.mean(dim=tuple(range(2, acts.ndim)))
        else:
            table = acts.reshape(int(np.prod(lab.shape)), -1)
        rows = table.index_select(0, rows_idx).double().cpu().numpy()
        assert rows.shape[1] == feats.shape[1]
        reservoir.place(rows, flat_labels[valid[idx]].astype(np.int64), slot, len(valid))

    def sample(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The accumulated rows and labels, or None when too few to score (< 8 rows or 1 class)."""
        reservoir = self.state["reservoir"]
        if reservoir is None or reservoir.rows is None or len(reservoir.rows) < self.min_rows:
            return None
        if len(np.unique(reservoir.labels)) < 2:
            return None
        return reservoir.rows, reservoir.labels

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "_pending"):
            self._pending = []


class ProbeF1(_TaskMetric):
    """Macro-F1 of a logistic-regression probe from the layer's activations to the labels.

    A multinomial logistic regression (L2, C=1, standardised features) fitted on a stratified 75 %
    of the sample, scored on the held-out 25 % (:func:`sonde.functional.probe_f1`).

    Args:
        samples: reservoir rows per layer in training-batch mode (default 2000).
        pool: ``"flatten"`` (default) or ``"mean"`` (channel pooling for per-sample labels).
        seed: seed of the split (and of the reservoir).
        every: as for every metric.
        compute_every: as for every metric (default 100).
        reset: as for every metric.

    Example:
        ``sonde.probe(model, metrics=[sonde.metrics.ProbeF1(compute_every=200)], probe_set=(x, y))``
    """

    name = "probe_f1"

    def compute(self) -> dict[str, Any]:
        sample = self.sample()
        if sample is None:
            return {}
        return {"probe_f1": probe_f1(sample[0], sample[1], seed=self.seed)}


class ClusterMI(_TaskMetric):
    """k-means of the layer's activations (k = number of classes) against the labels.

    Emits ``cluster_mi`` (nats), ``cluster_ami`` and ``cluster_nmi``
    (:func:`sonde.functional.cluster_mi`). Arguments as :class:`ProbeF1`.

    Example:
        ``sonde.probe(model, metrics=["cluster_mi"], probe_set=(x, y))``
    """

    name = "cluster_mi"
    outputs = ("cluster_mi", "cluster_ami", "cluster_nmi")

    def compute(self) -> dict[str, Any]:
        sample = self.sample()
        if sample is None:
            return {}
        scores = cluster_mi(sample[0], sample[1], seed=self.seed)
        return {"cluster_mi": scores.mi, "cluster_ami": scores.ami, "cluster_nmi": scores.nmi}
