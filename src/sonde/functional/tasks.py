"""Task scores of a layer (Vivisect's, to the definitions in docs/metrics.md#task-scores): host-side, numpy + torch.

* :func:`probe_f1` — a multinomial logistic-regression probe (L2, C=1; binary logistic for two
  classes, as scikit-learn fits it; L-BFGS in numpy) from activations to labels, trained on a stratified 75 %
  split with a fixed seed and scored by macro-F1 on the held-out 25 %. Features are
  standardised with the training split's mean and standard deviation first (a probe should not
  depend on a layer's scale). Vivisect trained a hinge-loss SGD classifier and scored it on its
  own training data: sonde does not.
* :func:`cluster_mi` — k-means (k = number of distinct labels, k-means++, 10 inits, fixed seed)
  on the activations, compared with the labels: mutual information in nats, adjusted (AMI,
  Vinh et al. 2009) and normalised (NMI, arithmetic mean of the entropies) variants.
* :func:`task_samples` — how activations and labels become rows: labels shaped ``(B,)`` give
  one row per sample (the activation flattened, or channel-pooled); labels shaped like the
  activations' leading dimensions (``(B, T)`` for ``(B, T, d)``) give one row per position.
  Labels below 0 are padding and are left out.

Everything is implemented here (no scikit-learn at run time); the tests check it against
scikit-learn.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1, 2], 40)
    >>> x = rng.normal(size=(120, 4)) + 6.0 * np.eye(3, 4)[y]
    >>> probe_f1(x, y), round(cluster_mi(x, y).nmi, 3)
    (1.0, 1.0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from sonde.functional.similarity import as_features

__all__ = [
    "ClusterScores",
    "cluster_mi",
    "kmeans",
    "macro_f1",
    "mutual_info_scores",
    "probe_f1",
    "stratified_split",
    "task_samples",
]


def _labels(y: Any, n: int | None = None) -> np.ndarray:
    if hasattr(y, "detach") and hasattr(y, "cpu"):
        y = y.detach().cpu().numpy()
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one per sample), got shape {tuple(labels.shape)}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"expected one label per sample: {n} samples, got {labels.shape[0]} labels")
    return labels


def task_samples(activations: Any, labels: Any, pool: str = "flatten") -> tuple[np.ndarray, np.ndarray]:
    """Rows of features and their labels from a batch of activations and its labels.

    Args:
        activations: (B, ...) tensor or array.
        labels: (B,) — one row per sample, the activation flattened (``pool="flatten"``) or
            averaged over every dimension after the second (``pool="mean"``: channel-pooled conv
            maps, (B, C, H, W) → (B, C)); or shaped like the activations' leading dimensions
            (``(B, T)`` for ``(B, T, d)``, also ``(T, B)`` for ``(T, B, d)``) — one row per
            position, features the remaining dimensions flattened. Labels < 0 are dropped
            (padding).
        pool: ``"flatten"`` or ``"mean"`` (per-sample labels only).

    Example:
        >>> import torch
        >>> x, y = task_samples(torch.ones(2, 3, 4), torch.tensor([[0, 1, -1], [1, 0, 1]]))
        >>> x.shape, y.tolist()
        ((5, 4), [0, 1, 1, 0, 1])
    """
    if pool not in ("flatten", "mean"):
        raise ValueError(f"pool must be 'flatten' or 'mean', got {pool!r}")
    acts = activations.detach().cpu() if isinstance(activations, torch.Tensor) else torch.as_tensor(activations)
    lab = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if lab.ndim == 0 or lab.ndim >= acts.ndim or tuple(lab.shape) != tuple(acts.shape[: lab.ndim]):
        raise ValueError(
            f"labels must be (B,) or shaped like the activations' leading dimensions; activations "
            f"{tuple(acts.shape)}, labels {tuple(lab.shape)}"
        )
    if lab.is_floating_point():
        raise ValueError(f"labels must be integers (class ids), got dtype {lab.dtype}")
    rows = int(np.prod(lab.shape))
    if lab.ndim == 1 and pool == "mean" and acts.ndim > 2:
        feats = acts.double().mean(dim=tuple(range(2, acts.ndim)))
    else:
        feats = acts.reshape(rows, int(np.prod(acts.shape[lab.ndim:]))).double()  # rows may be 0: no -1
    flat = lab.reshape(-1).long()
    keep = flat >= 0
    return feats[keep].numpy(), flat[keep].numpy()


def stratified_split(y: Any, test_size: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, stratified by label, reproducible from ``seed``.

    Each class of n_c samples puts ``round(test_size · n_c)`` of them (at least 1 when n_c ≥ 2,
    never all of them) in the test part, chosen by a permutation drawn from
    ``numpy.random.default_rng(seed)``; a class with one sample trains only. Indices are sorted.

    Example:
        >>> train, test = stratified_split([0, 0, 0, 0, 1, 1, 1, 1])
        >>> len(train), len(test)
        (6, 2)
    """
    labels = _labels(y)
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = 0 if len(idx) < 2 else min(max(1, round(test_size * len(idx))), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """Unweighted mean over classes (those in either input) of ``2TP / (2TP + FP + FN)``.

    Example:
        >>> macro_f1([0, 0, 1, 1], [0, 1, 1, 1])
        0.7333333333333334
    """
    t, p = _labels(y_true), _labels(y_pred)
    scores = []
    for cls in np.union1d(t, p):
        tp = np.sum((t == cls) & (p == cls))
        scores.append(2.0 * tp / (np.sum(t == cls) + np.sum(p == cls)))
    return float(np.mean(scores))


def _logistic_objective(
    theta: np.ndarray, x: np.ndarray, target: np.ndarray, outputs: int, c: float
) -> tuple[float, np.ndarray]:
    """``(C·Σ log-loss + ½‖W‖²) / (nC)`` and its gradient; theta packs W (p × outputs) then b."""
    n, p = x.shape
    w = theta[: p * outputs].reshape(p, outputs)
    z = x @ w + theta[p * outputs :]
    if outputs == 1:  # binary: log(1 + e^z) − y·z
        z = z[:, 0]
        data = float(np.sum(np.logaddexp(0.0, z) - target * z))
        dz = (0.5 * (1.0 + np.tanh(0.5 * z)) - target)[:, None]  # sigmoid, overflow-free
    else:
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        data = float(np.sum(log_norm - z[np.arange(n), target]))
        dz = np.exp(z - log_norm[:, None])
        dz[np.arange(n), target] -= 1.0
    value = (data + 0.5 / c * float(np.sum(w * w))) / n
    grad = np.concatenate([((x.T @ dz) + w / c).reshape(-1), dz.sum(axis=0)]) / n
    return value, grad


def _fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``C·Σ log-loss + ½‖W‖²`` (intercept unpenalised) with L-BFGS in float64 numpy.

    The objective is strictly convex, so the minimiser (and the predictions) do not depend on the
    optimiser; iterations stop when the largest gradient entry of the 1/(nC)-scaled objective is
    below 1e-9. Plain numpy on the calling thread: no thread pool shared with training.
    """
    p = x.shape[1]
    outputs = 1 if n_classes == 2 else n_classes
    theta = np.zeros(p * outputs + outputs)
    value, grad = _logistic_objective(theta, x, y, outputs, c)
    history: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(5000):
        if np.max(np.abs(grad)) <= 1e-9:
            break
        direction = -grad  # two-loop recursion: direction = −H·grad
        alphas = []
        for s_k, y_k, rho in reversed(history):
            a = rho * float(s_k @ direction)
            alphas.append(a)
            direction = direction - a * y_k
        if history:
            s_k, y_k, _ = history[-1]
            direction = direction * (float(s_k @ y_k) / float(y_k @ y_k))
        for (s_k, y_k, rho), a in zip(history, reversed(alphas)):
            direction = direction + (a - rho * float(y_k @ direction)) * s_k
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            history.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0 if history else min(1.0, 1.0 / float(np.sum(np.abs(grad))))
        for _ in range(60):  # backtracking to the Armijo condition
            new_value, new_grad = _logistic_objective(theta + step * direction, x, y, outputs, c)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease possible at float64 precision: converged
        s_k, y_k = step * direction, new_grad - grad
        curvature = float(s_k @ y_k)
        if curvature > 1e-16:
            history.append((s_k, y_k, 1.0 / curvature))
            if len(history) > 20:
                history.pop(0)
        theta, value, grad = theta + s_k, new_value, new_grad
    return theta[: p * outputs].reshape(p, outputs), theta[p * outputs :]


def probe_f1(x: Any, y: Any, seed: int = 0, *, test_size: float = 0.25, c: float = 1.0) -> float:
    """Macro-F1 of a logistic-regression probe on a held-out, stratified split.

    Args:
        x: (n, p) activations (numpy or torch).
        y: (n,) integer labels.
        seed: seed of the split.
        test_size: held-out share (default 25 %).
        c: inverse L2 strength, as scikit-learn's ``C``.

    Returns:
        Macro-F1 on the held-out part, in [0, 1].

    Example:
        >>> import numpy as np
        >>> x = np.r_[np.zeros((20, 2)), np.ones((20, 2))] + np.random.default_rng(0).normal(0, .1, (40, 2))
        >>> probe_f1(x, [0] * 20 + [1] * 20)
        1.0
    """
    feats = as_features(x)
    raw = _labels(y, feats.shape[0])
    classes, codes = np.unique(raw, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"probe_f1 needs at least 2 distinct labels, got {len(classes)}")
    train, test = stratified_split(codes, test_size, seed)
    if len(test) == 0 or len(np.unique(codes[train])) < 2:
        raise ValueError(f"too few samples per class for a held-out split: {len(raw)} samples, {len(classes)} classes")
    mean = feats[train].mean(axis=0)
    std = feats[train].std(axis=0)
    std[std == 0] = 1.0
    z = (feats - mean) / std
    # Classes absent from the training part cannot be predicted; fit on those present.
    present, train_codes = np.unique(codes[train], return_inverse=True)
    w, b = _fit_logistic(z[train], train_codes.astype(np.int64), len(present), c)
    logits = z[test] @ w + b
    pred = (logits[:, 0] > 0).astype(np.int64) if logits.shape[1] == 1 else logits.argmax(axis=1)
    return macro_f1(codes[test], present[pred])


class ClusterScores(NamedTuple):
    """Agreement of a k-means clustering with the labels: MI in nats, AMI and NMI."""

    mi: float
    ami: float
    nmi: float


def _sq_distances(x: np.ndarray, centres: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    d = x_sq[:, None] - 2.0 * (x @ centres.T) + np.sum(centres * centres, axis=1)[None, :]
    return np.maximum(d, 0.0)


def kmeans(
    x: Any, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4
) -> np.ndarray:
    """Cluster assignments (n,) of Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs.

    Each run seeds with k-means++ (D² sampling) from ``numpy.random.default_rng(seed)`` and
    iterates until no assignment changes or the centres move less than ``tol`` times the mean
    feature variance (scikit-learn's criterion); the run with the least inertia wins. An emptied
    cluster is moved to the point farthest from its centre.

    Example:
        >>> a = kmeans([[0.0], [0.1], [5.0], [5.1]], 2)
        >>> bool(a[0] == a[1] != a[2] == a[3])
        True
    """
    feats = as_features(x)
    n = feats.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of samples ({n}), got {k}")
    rng = np.random.default_rng(seed)
    x_sq = np.sum(feats * feats, axis=1)
    threshold = tol * float(np.mean(np.var(feats, axis=0)))
    rows = np.arange(n)
    best, best_inertia = np.zeros(n, dtype=np.int64), np.inf
    for _ in range(n_init):
        centres = feats[[rng.integers(n)]]
        closest = _sq_distances(feats, centres, x_sq)[:, 0]
        for _ in range(1, k):
            total = closest.sum()
            pick = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
            centres = np.vstack([centres, feats[pick]])
            closest = np.minimum(closest, _sq_distances(feats, feats[[pick]], x_sq)[:, 0])
        assign = np.full(n, -1)
        for _ in range(max_iter):
            dist = _sq_distances(feats, centres, x_sq)
            new = dist.argmin(axis=1)
            if np.array_equal(new, assign):
                break
            assign = new
            counts = np.bincount(assign, minlength=k)
            for j in np.flatnonzero(counts == 0):  # empty cluster: take the worst-served point
                far = int(dist[rows, assign].argmax())
                assign[far] = j
                dist[far] = 0.0
            onehot = np.zeros((k, n))
            onehot[assign, rows] = 1.0
            moved = onehot @ feats / onehot.sum(axis=1)[:, None]
            shift = float(np.sum((moved - centres) ** 2))
            centres = moved
            if shift <= threshold:
                assign = _sq_distances(feats, centres, x_sq).argmin(axis=1)
                break
        inertia = _sq_distances(feats, centres, x_sq)[rows, assign].sum()
        if inertia < best_inertia:
            best, best_inertia = assign.copy(), inertia
    return best


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-np.sum(p * np.log(p)))


def mutual_info_scores(labels_true: Any, labels_pred: Any) -> ClusterScores:
    """MI (nats), AMI and NMI (arithmetic normalisation) of two labelings of the same samples.

    AMI = (MI − E[MI]) / (mean(H(U), H(V)) − E[MI]) with the expected MI under the
    hypergeometric model of Vinh et al. (2009). Two single-cluster labelings score 1.

    Example:
        >>> mutual_info_scores([0, 0, 1, 1], [1, 1, 0, 0]).nmi
        1.0
    """
    u = _labels(labels_true)
    v = _labels(labels_pred, u.shape[0])
    n = u.shape[0]
    _, ui = np.unique(u, return_inverse=True)
    _, vi = np.unique(v, return_inverse=True)
    table = np.zeros((ui.max() + 1, vi.max() + 1))
    np.add.at(table, (ui, vi), 1.0)
    a, b = table.sum(axis=1), table.sum(axis=0)
    nz = table > 0
    mi = float(np.sum(table[nz] / n * np.log(n * table[nz] / np.outer(a, b)[nz])))
    mi = max(mi, 0.0)
    if len(a) == len(b) == 1 or len(a) == len(b) == 0:
        return ClusterScores(mi, 1.0, 1.0)
    h_u, h_v = _entropy(a, n), _entropy(b, n)
    mean_h = (h_u + h_v) / 2.0
    nmi = mi / mean_h if mean_h > 0 else 1.0
    emi = _expected_mi(a.astype(np.int64), b.astype(np.int64), n)
    eps = np.finfo(np.float64).eps
    denominator = mean_h - emi
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return ClusterScores(mi, float((mi - emi) / denominator), float(nmi))


def _expected_mi(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """E[MI] of two labelings with marginals ``a`` and ``b`` under random permutation (Vinh 2009)."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    total = 0.0
    for ai in a:
        for bj in b:
            lo, hi = max(1, ai + bj - n), min(ai, bj)
            if lo > hi:
                continue
            nij = np.arange(lo, hi + 1)
            log_p = (
                log_fact[ai] + log_fact[bj] + log_fact[n - ai] + log_fact[n - bj] - log_fact[n]
                - log_fact[nij] - log_fact[ai - nij] - log_fact[bj - nij] - log_fact[n - ai - bj + nij]
            )
            total += float(np.sum(nij / n * np.log(n * nij / (ai * bj)) * np.exp(log_p)))
    return total


def cluster_mi(x: Any, y: Any, seed: int = 0, *, n_init: int = 10) -> ClusterScores:
    """k-means of the activations (k = number of distinct labels) scored against the labels.

    Args:
        x: (n, p) activations (numpy or torch).
        y: (n,) labels.
        seed: seed of the k-means++ initialisations.
        n_init: number of initialisations; the least inertia wins.

    Returns:
        ``ClusterScores(mi, ami, nmi)``: mutual information in nats, adjusted and normalised MI.

    Example:
        >>> import numpy as np
        >>> x = np.r_[np.zeros((10, 2)), np.full((10, 2), 9.0)]
        >>> round(cluster_mi(x, [0] * 10 + [1] * 10).mi, 4)  # log 2
        0.6931
    """
    feats = as_features(x)
    labels = _labels(y, feats.shape[0])
    k = len(np.unique(labels))
    if k < 2:
        raise ValueError(f"cluster_mi needs at least 2 distinct labels, got {k}")
    return mutual_info_scores(labels, kmeans(feats, k, seed=seed, n_init=n_init))
