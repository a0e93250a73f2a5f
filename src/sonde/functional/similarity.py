"""Representational similarity: linear CKA, minibatch CKA and SVCCA (host-side, float64).

Inputs are activations of a fixed set of samples, ``n`` samples × ``p`` features, as numpy
arrays or torch tensors (copied to the host in float64). Two inputs compared with each other
must hold the same samples in the same order; their feature counts may differ.

* :func:`cka` — linear CKA (Kornblith et al. 2019) with column-centred X and Y:
  ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``. Invariant to orthogonal transforms and isotropic scaling
  of either input; 1 for identical inputs.
* :class:`MinibatchCKA` — CKA over many batches (Nguyen et al. 2021): the unbiased HSIC
  estimator (Song et al. 2012) of linear Gram matrices averaged over batches, then
  ``mean HSIC(K, L) / sqrt(mean HSIC(K, K) · mean HSIC(L, L))``. It never holds more than one
  batch, so it serves probe sets of any size; it is not the same number as :func:`cka` on the
  concatenation (the latter is biased), but converges to the same population value.
* :func:`svcca` — SVCCA (Raghu et al. 2017): centre, keep the top singular directions that
  explain ``keep`` of the variance of each input, run CCA between the two reduced views, and
  return the mean canonical correlation.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> round(cka(x, 3.0 * x), 6), round(svcca(x, x @ np.eye(8)[::-1]), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MinibatchCKA", "as_features", "cka", "gram", "hsic_unbiased", "svcca"]


def as_features(x: Any, name: str = "x") -> np.ndarray:
    """``x`` as a float64 numpy array of shape (samples, features).

    Accepts numpy arrays and torch tensors (detached and copied to the host). A 1-D input is one
    feature per sample. Higher-dimensional inputs are refused: reshape to ``(n, -1)`` (flatten)
    or pool first, whichever the analysis means.

    Example:
        >>> as_features([1.0, 2.0]).shape
        (2, 1)
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be (samples, features), got shape {tuple(array.shape)}; "
            "reshape to (n, -1) or pool the extra dimensions first"
        )
    return array


def _pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = as_features(x, "x"), as_features(y, "y")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y must hold the same samples: x has {xs.shape[0]} rows, y has {ys.shape[0]}")
    if xs.shape[0] < 2:
        raise ValueError(f"similarity needs at least 2 samples, got {xs.shape[0]}")
    return xs, ys


def cka(x: Any, y: Any) -> float:
    """Linear CKA of two representations of the same samples (Kornblith et al. 2019).

    Columns are centred; the value is ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` in [0, 1], computed
    through the n × n Gram matrices when there are fewer samples than features. NaN when either
    input is constant (zero variance): similarity is undefined there.

    Args:
        x: (n, p) activations.
        y: (n, q) activations of the same n samples.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(50, 4))
        >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
        >>> round(cka(x, x @ q), 6)
        1.0
    """
    xs, ys = _pair(x, y)
    xs = xs - xs.mean(axis=0)
    ys = ys - ys.mean(axis=0)
    n, p, q = xs.shape[0], xs.shape[1], ys.shape[1]
    if n < max(p, q):
        kx, ky = xs @ xs.T, ys @ ys.T
        cross, norm_x, norm_y = float(np.sum(kx * ky)), float(np.linalg.norm(kx)), float(np.linalg.norm(ky))
    else:
        cross = float(np.linalg.norm(ys.T @ xs) ** 2)
        norm_x, norm_y = float(np.linalg.norm(xs.T @ xs)), float(np.linalg.norm(ys.T @ ys))
    if norm_x == 0.0 or norm_y == 0.0:
        return float("nan")
    return cross / (norm_x * norm_y)


def gram(x: Any) -> np.ndarray:
    """The linear Gram matrix ``X Xᵀ`` (n × n, float64) of (n, p) activations, uncentred.

    Example:
        >>> gram([[1.0, 0.0], [1.0, 1.0]]).tolist()
        [[1.0, 1.0], [1.0, 2.0]]
    """
    xs = as_features(x)
    return xs @ xs.T


def _hsic_terms(grams: list[np.ndarray]) -> np.ndarray:
    """Unbiased HSIC of every pair of Gram matrices of one batch (a k × k matrix)."""
    n = grams[0].shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples per batch, got {n}")
    flat = np.empty((len(grams), n * n))
    rows = np.empty((len(grams), n))
    for i, k in enumerate(grams):
        if k.shape != (n, n):
            raise ValueError(f"Gram matrices of one batch must all be {n}×{n}, got {k.shape}")
        k = k.copy()
        np.fill_diagonal(k, 0.0)
        flat[i] = k.reshape(-1)
        rows[i] = k.sum(axis=1)
    totals = rows.sum(axis=1)
    trace = flat @ flat.T  # tr(K̃ L̃) for symmetric matrices
    ones = rows @ rows.T  # 1ᵀ K̃ L̃ 1
    return (trace + np.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 * ones / (n - 2)) / (n * (n - 3))


def hsic_unbiased(k: Any, l: Any) -> float:  # noqa: E741 - the paper's names
    """Unbiased HSIC estimator (Song et al. 2012) of two n × n Gram matrices, n ≥ 4.

    ``1/(n(n−3)) [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1]`` with K̃, L̃ the Gram
    matrices with their diagonals set to zero.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(10, 3))
        >>> hsic_unbiased(gram(x), gram(x)) > 0
        True
    """
    return float(_hsic_terms([np.asarray(k, dtype=np.float64), np.asarray(l, dtype=np.float64)])[0, 1])


class MinibatchCKA:
    """Linear CKA of k representations accumulated over batches (Nguyen et al. 2021).

    Each :meth:`update` takes the k representations of one batch (same samples, any feature
    counts) — or their Gram matrices through :meth:`update_grams` — and adds the unbiased HSIC
    of every pair. :meth:`matrix` is the k × k CKA matrix, :meth:`value` the CKA of the first
    two. Batches need at least 4 samples. Accumulators merge (:meth:`merge`), so batches may be
    split across workers.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> acc = MinibatchCKA()
        >>> for _ in range(3):
        ...     x = rng.normal(size=(32, 5))
        ...     acc.update(x, 2.0 * x)
        >>> round(acc.value(), 6)
        1.0
    """

    def __init__(self) -> None:
        self.hsic: np.ndarray | None = None
        self.batches = 0

    def update(self, *views: Any) -> None:
        """Add one batch: its representations, each (n, p_i) for the same n samples."""
        self.update_grams(*(gram(v) for v in views))

    def update_grams(self, *grams: np.ndarray) -> None:
        """Add one batch given the linear Gram matrix ``X Xᵀ`` of each representation."""
        if len(grams) < 2:
            raise ValueError(f"CKA compares at least 2 representations per batch, got {len(grams)}")
        terms = _hsic_terms([np.asarray(g, dtype=np.float64) for g in grams])
        if self.hsic is None:
            self.hsic = terms
        elif self.hsic.shape != terms.shape:
            raise ValueError(f"every batch must bring {self.hsic.shape[0]} representations, got {len(grams)}")
        else:
            self.hsic = self.hsic + terms
        self.batches += 1

    def merge(self, other: MinibatchCKA) -> None:
        """Fold in another accumulator's batches."""
        if other.hsic is None:
            return
        if self.hsic is None:
            self.hsic = other.hsic.copy()
        else:
            self.hsic = self.hsic + other.hsic
        self.batches += other.batches

    def matrix(self) -> np.ndarray:
        """The k × k CKA matrix; NaN where a representation had no positive self-HSIC (constant)."""
        if self.hsic is None:
            raise ValueError("MinibatchCKA has no batch yet; call update() first")
        diag = np.diag(self.hsic)
        denom = np.sqrt(np.outer(diag, diag))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where((denom > 0) & np.isfinite(denom), self.hsic / np.where(denom > 0, denom, 1.0), np.nan)
        return np.asarray(out)

    def value(self) -> float:
        """CKA of the first two representations."""
        return float(self.matrix()[0, 1])


def _top_directions(xs: np.ndarray, keep: float) -> np.ndarray:
    """Orthonormal basis (n × k) of the top singular directions explaining ``keep`` of the variance."""
    u, s, _ = np.linalg.svd(xs, full_matrices=False)
    power = s**2
    total = power.sum()
    if total <= 0:
        return u[:, :0]
    share = np.cumsum(power) / total
    k = int(np.searchsorted(share, keep - 1e-12) + 1)
    return u[:, : min(k, len(s))]


def svcca(x: Any, y: Any, keep: float = 0.99) -> float:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation of the SVD-reduced views.

    Each input is centred and reduced to its top singular directions that together explain at
    least ``keep`` of its variance; CCA between the two reduced views gives min(k_x, k_y)
    canonical correlations, whose mean is returned (in [0, 1]). NaN when either input is
    constant. Use many more samples than kept directions: with n close to k every pair of views
    looks perfectly correlated.

    Args:
        x: (n, p) activations.
        y: (n, q) activations of the same n samples.
        keep: share of variance the kept singular directions explain, in (0, 1].

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(200, 6))
        >>> round(svcca(x, x[:, ::-1] * 5.0), 6)
        1.0
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a share of variance in (0, 1], got {keep!r}")
    xs, ys = _pair(x, y)
    qx = _top_directions(xs - xs.mean(axis=0), keep)
    qy = _top_directions(ys - ys.mean(axis=0), keep)
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return float("nan")
    # The reduced view of x is U_k·diag(s_k): its column space has the orthonormal basis U_k, and
    # the canonical correlations of two centred views are the singular values of Q_xᵀ Q_y.
    rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
    return float(np.clip(rho, 0.0, 1.0).mean())
