"""Saturation and intrinsic dimensionality of a layer's activations (Delve's family).

The training thread only accumulates covariance sums on the tensor's device: one product
``XᵀX`` per batch of rows centred on a fixed per-layer shift, its lower block triangle only
(10/16 of a d×d matmul), in float32 by default (``precision=``), added into float64 sums. The
eigenvalues (``syevd``, values only) are computed on the probe's background worker, only at the
steps ``compute_every`` names (default: every 10th step). Train and eval phases accumulate apart.
See :mod:`sonde.functional.saturation` for the definitions.

On a CUDA GPU the sums stay there as the metric's state (nothing is read back on the training
thread, not even the shift), and the worker computes the eigenvalues on the GPU, on the stream
the sums were made on, reading back the d eigenvalues and the trace through an event. On the
CPU the sums go to a reused buffer and are folded into host state at the steps that compute.
Under torch.distributed each rank's sums are re-expressed around zero before they are added
across ranks (every rank has its own shift).

Example:
    >>> import torch
    >>> from sonde.metrics.base import Capture
    >>> m = Saturation(threshold=0.99)
    >>> m.update(Capture(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), layer_type="Linear"))
    >>> m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    >>> out = m.compute()
    >>> out["intrinsic_dim"], out["saturation"], out["cov_trace"]
    (1.0, 0.5, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import torch

from sonde.errors import ConfigError
from sonde.functional.saturation import (
    add_lower,
    augmented_gram,
    feature_rows,
    intrinsic_dimension,
    log_det,
    nystrom_eigenvalues,
    orthonormal_test_matrix,
    sketch_sums,
    symmetric,
)
from sonde.metrics.base import Capture, Metric
from sonde.metrics.transfer import on_stream, read_back
from sonde.schedules import Schedule
from sonde.topics import TENSOR_TOPICS

__all__ = ["Saturation"]

_APPROXIMATE = (None, "auto", "sketch")
_PRECISIONS = ("float32", "float64")


class Saturation(Metric):
    """``saturation``, ``intrinsic_dim``, ``cov_trace``, ``cov_logdet`` and the top-k ``eigenvalues``.

    ``intrinsic_dim`` is the number of leading principal directions holding ``threshold`` of the
    variance of a layer's features; ``saturation`` is that over the number of features. Features
    per sample: Linear (B, d); convolutions channel-wise (B·H·W, C); sequence layers (LSTM,
    GRU, RNN, attention, transformer) every time step a sample (B·T, d), whichever their
    ``batch_first``; see :func:`sonde.functional.feature_rows`.

    Cost: per recorded batch and layer, one float32 product of the rows (10/16 of a d×d matmul);
    per computed value, one d×d eigenvalue decomposition on the worker (~46 ms on one core at
    d = 1024 in float32, ~63 ms in float64). ``benchmarks/saturation.py`` on a 2-core CPU (every
    Linear layer of a 4×1024 MLP, batch 256, computed every 10th step): 2.2–2.6× the unmonitored
    step (the updates alone 1.3–1.4×; ``precision="float64"`` 2.6–3.0×; Delve's
    ``SaturationTracker`` 4.2–4.5×). The worker's eigendecompositions compete with torch's threads
    for the two cores, so on a small CPU compute less often (``compute_every=``) to pay less.

    Args:
        threshold: share of the variance the leading directions must hold (Delve: 0.99).
        compute_every: steps at which a value is computed (default every 10th); the covariance
            accumulates over every recorded batch in between.
        reset: ``"compute"`` (each value covers the batches since the previous one), ``"epoch"``
            (call ``probe.end_epoch()``) or ``"never"``.
        top_k: how many of the largest eigenvalues ``eigenvalues`` holds.
        approximate: None (exact covariance), ``"sketch"`` (a Nyström sketch of ``sketch_size``
            random directions: O(rows·d·sketch_size) per batch instead of O(rows·d²)) or
            ``"auto"`` (the sketch for layers with ≥ 2048 features). With the sketch,
            ``cov_trace`` stays exact, eigenvalues are under-estimates, ``intrinsic_dim`` is NaN
            when the sketch holds less than ``threshold`` of the variance, and ``cov_logdet``
            spreads the unseen variance evenly over the unseen directions.
        sketch_size: directions the sketch keeps.
        eps: the ε of ``cov_logdet = log det(C + εI)``.
        precision: ``"float32"`` (default) or ``"float64"``: the dtype of each step's product
            and of the eigenvalue decomposition; the sums always accumulate in float64 and
            ``cov_trace`` is read from them. Rows are first centred on a fixed per-layer shift
            (the first batch's mean), so a large mean costs no precision (unless it drifts far
            from that shift, relative to the features' spread). float32 is about twice as fast
            on a CPU; eigenvalues then carry an absolute error of ~1e-6 of the largest one
            (measured at d = 1024: top-5 eigenvalues within 3e-6 relative, ``cov_trace`` ≤ 3e-8,
            full-rank ``cov_logdet`` 3e-6, ``intrinsic_dim`` equal), which only matters for
            ``cov_logdet`` of a (nearly) rank-deficient layer, where eigenvalues near ``eps``
            count: use ``"float64"`` there (every output then within 1e-6 of numpy's).
        features: ``"auto"``, ``"channels"``, ``"last"`` or ``"flatten"`` (see ``feature_rows``).
        topics: the topics it applies to (default ``("activations",)``).
        every: when ``update`` runs (default: the probe's ``every=``).

    Example:
        ``sonde.probe(model, metrics=[sonde.metrics.Saturation(threshold=0.99, compute_every=10)])``
    """

    name = "saturation"
    outputs = ("saturation", "intrinsic_dim", "cov_trace", "cov_logdet", "eigenvalues")
    topics: ClassVar[tuple[str, ...]] = ("activations",)
    offload: ClassVar[bool] = True
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"threshold": (0.0, 1.0), "top_k": (1, 4096),
                                                       "sketch_size": (2, 8192), "eps": (0.0, 1.0)}
    #: Width from which ``approximate="auto"`` sketches.
    wide: ClassVar[int] = 2048
    #: The device types whose exact sums stay on the device as state, computed there (tests add
    #: ``"cpu"`` to run that path on a CPU).
    device_types: ClassVar[tuple[str, ...]] = ("cuda",)

    def __init__(
        self,
        threshold: float = 0.99,
        *,
        compute_every: int | Schedule | None = 10,
        reset: str = "compute",
        top_k: int = 5,
        approximate: str | None = None,
        sketch_size: int = 512,
        eps: float = 1e-6,
        features: str = "auto",
        precision: str = "float32",
        topics: Sequence[str] | None = None,
        every: int | Schedule | None = None,
    ) -> None:
        self.check_settings(threshold=threshold, top_k=top_k, sketch_size=sketch_size, eps=eps)
        super().__init__(every=every, compute_every=compute_every, reset=reset)
        if not 0 < threshold <= 1:
            raise ConfigError(f"Saturation(threshold=) expects a share in (0, 1], got {threshold!r}")
        if approximate not in _APPROXIMATE:
            raise ConfigError(f"Saturation(approximate=) expects None, 'auto' or 'sketch', got {approximate!r}")
        if precision not in _PRECISIONS:
            raise ConfigError(f"Saturation(precision=) expects 'float32' or 'float64', got {precision!r}")
        if not isinstance(top_k, int) or top_k < 1 or not isinstance(sketch_size, int) or sketch_size < 2:
            raise ConfigError(f"Saturation expects top_k >= 1 and sketch_size >= 2, got {top_k!r}, {sketch_size!r}")
        if topics is not None:
            unknown = [t for t in topics if t not in TENSOR_TOPICS]
            if unknown or isinstance(topics, str):
                raise ConfigError(f"Saturation(topics=) takes tensor topics ({', '.join(TENSOR_TOPICS)}), "
                                  f"got {topics!r}")
            self.topics = tuple(topics)  # type: ignore[misc]
        feature_rows(torch.zeros(1, 1), layout=features)  # validates the layout name now
        self.threshold = threshold
        self.top_k = top_k
        self.approximate = approximate
        self.sketch_size = sketch_size
        self.eps = eps
        self.features = features
        self.precision = precision
        self.dims: int | None = None
        # Subtracted from every row before the product (the first batch's mean, for the instance's
        # life); configuration like omega: sums with another shift are re-centred in merge.
        self.shift: torch.Tensor | None = None
        self.shift_host: np.ndarray | None = None
        self.omega: torch.Tensor | None = None  # the sketch's test matrix (configuration, not state)
        self._gram: torch.Tensor | None = None  # reused float32 product of one batch
        self._scratch: torch.Tensor | None = None  # reused rows buffer, last column ones
        # On the CPU, the exact mode's float64 sums since the last fold, in a buffer reused for the
        # instance's life: folded into the host state at the steps that compute (see _fold).
        self._acc: torch.Tensor | None = None
        self._pending = False
        # On a device of device_types, the stream the sums were made on (None: the current one).
        self.stream: Any = None
        # The lower triangle of [[XᵀX, ΣX], [ΣXᵀ, n]] of the shifted rows X, or XᵀXΩ when
        # sketching (then with "sum" and "squares").
        self.add_state("gram", default=0.0, reduce="sum")
        self.add_state("sum", default=0.0, reduce="sum")
        self.add_state("squares", default=0.0, reduce="sum")  # Σ‖x‖², for the sketch's exact trace
        self.add_state("rows", default=0.0, reduce="sum")

    @property
    def sketching(self) -> bool:
        if self.approximate is None or self.dims is None:
            return False
        return self.approximate == "sketch" or self.dims >= self.wide

    def update(self, capture: Capture) -> None:
        rows = feature_rows(capture.tensor.detach(), capture.layer_type, self.features)
        if rows.shape[0] == 0:
            return
        dims = int(rows.shape[1])
        if self.dims is None:
            self.dims = dims
        elif dims != self.dims:
            raise ValueError(f"layer {capture.layer!r} had {self.dims} features per sample and now has {dims}; "
                             "saturation needs a fixed width (use features='channels' or 'last')")
        if self.sketching:
            size = min(self.sketch_size, dims)
            if self.omega is None or self.omega.device != rows.device:
                self.omega = orthonormal_test_matrix(dims, size).to(rows.device)
            y, total, squares, n = sketch_sums(rows, self.omega)
            self.stage("gram", y)
            self.stage("squares", squares)
            self.stage("sum", total)
        else:
            self._update_exact(rows)
            n = int(rows.shape[0])
            if capture.phase != "train" or self.due(capture.step):
                self._fold()  # a value is computed at this step's flush
        self.state["rows"] += float(n)  # known on the host already: nothing to transfer

    def _update_exact(self, rows: torch.Tensor) -> None:
        # One product gives XᵀX, ΣX and n (see augmented_gram), into buffers kept across steps:
        # fresh multi-megabyte allocations page-fault and cost more than the arithmetic on a CPU.
        n, dims = rows.shape
        dtype = torch.float64 if self.precision == "float64" or rows.dtype == torch.float64 else torch.float32
        scratch = self._scratch
        if scratch is None or scratch.device != rows.device or scratch.dtype != dtype or scratch.shape[0] < n:
            scratch = self._scratch = torch.ones(n, dims + 1, dtype=dtype, device=rows.device)
        on_device = rows.device.type in self.device_types
        shift = self.shift
        if shift is None or shift.device != rows.device or shift.dtype != dtype:
            if self.shift_host is None and shift is None:
                # The first batch's mean in the product's dtype (any shift is exact). On a device
                # of device_types it stays there; its host copy is read when a merge needs it.
                shift = self.shift = rows.detach().to(dtype).mean(dim=0)
                if not on_device:
                    self.shift_host = shift.cpu().numpy().astype(np.float64)
            else:
                host = self._shift_on_host()
                assert host is not None
                shift = self.shift = torch.from_numpy(host).to(device=rows.device, dtype=dtype)
        if on_device:
            if rows.device.type == "cuda":
                self.stream = torch.cuda.current_stream(rows.device)
            target = self.state["gram"]
            fresh = not isinstance(target, torch.Tensor)
            if fresh:  # the sums of this step on: the state itself, on the device
                target = torch.zeros(dims + 1, dims + 1, dtype=torch.float64, device=rows.device)
        else:
            target = self._acc
            if target is None or target.device != rows.device:
                target = self._acc = torch.zeros(dims + 1, dims + 1, dtype=torch.float64, device=rows.device)
            fresh = not self._pending
        if dtype == torch.float64:
            augmented_gram(rows, out=target, scratch=scratch, accumulate=not fresh, lower_only=True, shift=shift)
        else:
            # A float32 product (the fast one), summed into the float64 sums block by block.
            gram = self._gram
            if gram is None or gram.device != rows.device:
                gram = self._gram = torch.zeros(dims + 1, dims + 1, dtype=dtype, device=rows.device)
            augmented_gram(rows, out=gram, scratch=scratch, lower_only=True, shift=shift)
            add_lower(target, gram, first=fresh)
        if not on_device:
            self._pending = True
        elif fresh:
            self.absorb("gram", target)

    def _shift_on_host(self) -> np.ndarray | None:
        """The shift as a float64 host array (read back, through an event, when it lives on a GPU);
        None before the first batch."""
        if self.shift_host is None and self.shift is not None:
            self.shift_host = read_back(self.shift, self.stream).astype(np.float64)
        return self.shift_host

    def _fold(self) -> None:
        """Fold the CPU buffer's sums into the host state (at the steps that compute)."""
        if self._pending and self._acc is not None:
            self._pending = False
            self.absorb("gram", self._acc.detach().cpu().numpy())

    def _gram_on_host(self) -> Any:
        """The state's sums as a host array (read back, through an event, when they live on a GPU)."""
        gram = self.state.get("gram")
        return read_back(gram, self.stream) if isinstance(gram, torch.Tensor) else gram

    def shared_state(self) -> dict[str, Any]:
        """The state with the sums on the host and re-expressed around zero, which every rank
        shares (each rank has its own shift), for adding across ranks."""
        self._fold()
        state = dict(self.state)
        gram, shift = self._gram_on_host(), self._shift_on_host()
        if self.sketching or not isinstance(gram, np.ndarray) or shift is None:
            return state
        state["gram"] = _recentre(np.asarray(gram, dtype=np.float64), shift)
        return state

    def absorb(self, name: str, value: Any) -> None:
        current = self.state.get(name)
        if name == "gram" and isinstance(value, torch.Tensor):
            if isinstance(current, torch.Tensor):
                with on_stream(self.stream):
                    current.add_(value)  # in place: this instance owns its state
                return
            if current is None or (np.ndim(current) == 0 and current == 0):
                self.state[name] = value  # the sums update() made for the state
                return
            value = read_back(value, self.stream)
        if name == "gram" and isinstance(value, np.ndarray):
            if isinstance(current, np.ndarray) and current.shape == value.shape:
                np.add(current, value, out=current)  # in place: this instance owns its state arrays
                return
            if current is None or (np.ndim(current) == 0 and current == 0):
                # The first partial: a copy (it may view a reused buffer, the exact mode's accumulator).
                self.state[name] = value.astype(np.float64)
                return
        super().absorb(name, value)

    def merge(self, other: Metric) -> None:
        """Fold another instance's state in, re-centring its sums when its shift differs from ours."""
        self._fold()
        self.state["gram"] = self._gram_on_host()
        self._shift_on_host()  # sets shift_host, read below, once there is a shift
        theirs = None
        if isinstance(other, Saturation):
            other._fold()
            other.state["gram"] = other._gram_on_host()
            theirs = other._shift_on_host()
        gram = other.state.get("gram")
        if self.sketching or theirs is None or not isinstance(gram, np.ndarray):
            super().merge(other)
            return
        if self.shift_host is None:
            self.shift_host, self.dims = theirs, getattr(other, "dims", self.dims)
        elif not np.array_equal(theirs, self.shift_host):
            state = dict(other.state)
            state["gram"] = _recentre(gram, theirs - self.shift_host)
            for name, value in state.items():
                self.absorb(name, value)
            self.updates += other.updates
            return
        super().merge(other)

    def snapshot(self) -> Metric:
        self._fold()
        with on_stream(self.stream):  # a copy of sums kept on the device is made on their stream
            return super().snapshot()

    def compute(self) -> dict[str, Any]:
        self._fold()
        n = float(self.state["rows"])
        if n <= 0 or self.dims is None:
            return {}
        dims = self.dims
        if self.sketching:
            mean = np.asarray(self.state["sum"], dtype=np.float64) / n
            if self.omega is None:
                return {}
            omega = read_back(self.omega, self.stream)
            c_omega = np.asarray(self.state["gram"]) / n - np.outer(mean, mean @ omega)
            values = nystrom_eigenvalues(c_omega, omega)
            trace = max(float(self.state["squares"]) / n - float(mean @ mean), 0.0)
            dim = intrinsic_dimension(values, self.threshold, total=trace)
            logdet = log_det(values, self.eps, dims, rest=trace - float(values.sum()))
        elif isinstance(self.state["gram"], torch.Tensor):
            values, trace = self._eigenvalues_on_device(self.state["gram"], n, dims)
            dim = intrinsic_dimension(values, self.threshold)
            logdet = log_det(values, self.eps)
        else:
            # Only the lower triangle is read: the state holds it (see augmented_gram).
            gram = np.asarray(self.state["gram"], dtype=np.float64)
            mean = gram[dims, :dims] / n  # the row of sums (the column above is not written)
            cov = gram[:dims, :dims] / n
            cov -= np.multiply.outer(mean, mean)
            if self.precision == "float32":  # LAPACK ssyevd: ~25% less time than dsyevd at d = 1024
                lam = scipy.linalg.eigvalsh(cov.astype(np.float32), lower=True, driver="evd", overwrite_a=True,
                                            check_finite=False).astype(np.float64)
            else:
                lam = np.linalg.eigvalsh(cov, UPLO="L")
            values = np.clip(lam[::-1], 0.0, None)
            trace = float(np.trace(cov))
            dim = intrinsic_dimension(values, self.threshold)
            logdet = log_det(values, self.eps)
        return {
            "saturation": dim / dims,
            "intrinsic_dim": float(dim),
            "cov_trace": trace,
            "cov_logdet": logdet,
            "eigenvalues": np.asarray(values[: self.top_k], dtype=np.float64),
        }

    def _eigenvalues_on_device(self, gram: torch.Tensor, n: float, dims: int) -> tuple[np.ndarray, float]:
        """The covariance's eigenvalues (descending, ≥ 0) and trace, computed on the sums' device;
        only those d + 1 numbers come back. ``eigvalsh`` checks its result on the device, which
        waits for the GPU on this thread: the worker's, never the training thread."""
        with on_stream(self.stream):
            mean = gram[dims, :dims] / n  # the row of sums (the column above is not written)
            cov = gram[:dims, :dims] / n - torch.outer(mean, mean)
            dtype = torch.float32 if self.precision == "float32" else torch.float64
            lam = torch.linalg.eigvalsh(cov.to(dtype), UPLO="L").to(torch.float64)
            host = read_back(torch.cat([lam, cov.diagonal().sum().reshape(1)]))
        return np.clip(host[-2::-1], 0.0, None), float(host[-1])

    def reset(self) -> None:
        super().reset()
        self._pending = False  # the accumulator's sums are dropped with the state
        # dims, omega, shift and the buffers are configuration fixed at the first batch, not state.


def _recentre(gram: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Augmented sums of rows x − o re-expressed for rows x − c, given δ = o − c (a new array)."""
    full = symmetric(gram)
    dims = len(delta)
    total, n = full[dims, :dims].copy(), full[dims, dims]
    full[:dims, :dims] += np.multiply.outer(total, delta) + np.multiply.outer(delta, total + n * delta)
    full[dims, :dims] = full[:dims, dims] = total + n * delta
    return full
