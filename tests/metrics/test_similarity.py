"""CKA, minibatch CKA and SVCCA against the formulas written here, plus their invariances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import sonde.functional as F


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. for linear CKA, with an explicit centring matrix H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    xc, yc = h @ x, h @ y
    cross = np.linalg.norm(yc.T @ xc, "fro") ** 2
    return float(cross / (np.linalg.norm(xc.T @ xc, "fro") * np.linalg.norm(yc.T @ yc, "fro")))


def reference_hsic1(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012) unbiased HSIC, written term by term."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def reference_svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """Raghu et al. (2017): SVD reduction, then CCA through Σxx^-½ Σxy Σyy^-½."""

    def reduce(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=0)
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(share >= keep - 1e-12)) + 1
        return a @ vt[:k].T

    xr, yr = reduce(x), reduce(y)
    n = x.shape[0]
    sxx, syy, sxy = xr.T @ xr / n, yr.T @ yr / n, xr.T @ yr / n
    inv_sqrt_x = scipy.linalg.fractional_matrix_power(sxx, -0.5).real
    inv_sqrt_y = scipy.linalg.fractional_matrix_power(syy, -0.5).real
    rho = np.linalg.svd(inv_sqrt_x @ sxy @ inv_sqrt_y, compute_uv=False)
    return float(np.mean(np.clip(rho[: min(xr.shape[1], yr.shape[1])], 0, 1)))


def test_cka_matches_the_formula_in_both_regimes() -> None:
    rng = _rng()
    x = rng.normal(size=(80, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(80, 4))
    assert F.cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-10)
    wide_x, wide_y = rng.normal(size=(20, 50)), rng.normal(size=(20, 30))  # n < p: Gram route
    assert F.cka(wide_x, wide_y) == pytest.approx(reference_cka(wide_x, wide_y), rel=1e-10)


def test_cka_invariances() -> None:
    rng = _rng(1)
    x = rng.normal(size=(60, 8))
    y = np.tanh(x @ rng.normal(size=(8, 5)))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = F.cka(x, y)
    assert F.cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert F.cka(7.5 * x, 0.1 * y) == pytest.approx(base, rel=1e-10)
    assert F.cka(x + 3.0, y) == pytest.approx(base, rel=1e-10)  # centring
    assert F.cka(x, x) == pytest.approx(1.0, rel=1e-12)
    assert F.cka(x, y) == pytest.approx(F.cka(y, x), rel=1e-12)
    # not invariant to an arbitrary invertible linear map (that is what CCA would be)
    assert F.cka(x @ np.diag(np.arange(1.0, 9.0)), y) != pytest.approx(base, rel=1e-3)


def test_cka_accepts_torch_and_rejects_bad_shapes() -> None:
    x = torch.randn(30, 4)
    assert F.cka(x, x.double() * 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same samples"):
        F.cka(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match=r"\(samples, features\)"):
        F.cka(np.zeros((5, 2, 2)), np.zeros((5, 2)))
    assert np.isnan(F.cka(np.ones((5, 2)), np.random.default_rng(0).normal(size=(5, 2))))


def test_hsic_and_minibatch_cka_match_the_paper() -> None:
    rng = _rng(2)
    batches = [(rng.normal(size=(16, 5)), rng.normal(size=(16, 3))) for _ in range(4)]
    batches = [(x, x[:, :3] + 0.3 * y) for x, y in batches]
    for x, y in batches:
        assert F.hsic_unbiased(x @ x.T, y @ y.T) == pytest.approx(reference_hsic1(x @ x.T, y @ y.T), rel=1e-10)
    acc = F.MinibatchCKA()
    for x, y in batches:
        acc.update(x, y)
    xy = np.mean([reference_hsic1(x @ x.T, y @ y.T) for x, y in batches])
    xx = np.mean([reference_hsic1(x @ x.T, x @ x.T) for x, _ in batches])
    yy = np.mean([reference_hsic1(y @ y.T, y @ y.T) for _, y in batches])
    assert acc.value() == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-10)
    matrix = acc.matrix()
    assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 1.0)
    # merging two halves gives the same as one accumulator over all batches
    left, right = F.MinibatchCKA(), F.MinibatchCKA()
    for i, (x, y) in enumerate(batches):
        (left if i < 2 else right).update(x, y)
    left.merge(right)
    assert left.value() == pytest.approx(acc.value(), rel=1e-12)


def test_minibatch_cka_is_invariant_and_needs_four_samples() -> None:
    rng = _rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    acc = F.MinibatchCKA()
    for _ in range(3):
        x = rng.normal(size=(32, 6))
        acc.update(x, 4.0 * x @ q)
    assert acc.value() == pytest.approx(1.0, rel=1e-10)
    with pytest.raises(ValueError, match="at least 4 samples"):
        F.MinibatchCKA().update(np.zeros((3, 2)), np.zeros((3, 2)))


def test_svcca_matches_the_formula() -> None:
    rng = _rng(4)
    latent = rng.normal(size=(500, 4))
    x = latent @ rng.normal(size=(4, 10)) + 0.05 * rng.normal(size=(500, 10))
    y = np.tanh(latent[:, :3]) @ rng.normal(size=(3, 7)) + 0.3 * rng.normal(size=(500, 7))
    for keep in (0.99, 0.9, 0.5):
        assert F.svcca(x, y, keep=keep) == pytest.approx(reference_svcca(x, y, keep), rel=1e-6)


def test_svcca_is_invariant_to_invertible_maps_and_bounded() -> None:
    rng = _rng(5)
    x = rng.normal(size=(300, 5))
    mixed = x @ rng.normal(size=(5, 5)) + 2.0
    assert F.svcca(x, mixed, keep=1.0) == pytest.approx(1.0, abs=1e-9)
    independent = F.svcca(x, rng.normal(size=(300, 5)))
    assert 0.0 <= independent < 0.3
    with pytest.raises(ValueError, match="keep"):
        F.svcca(x, x, keep=0.0)
    assert np.isnan(F.svcca(np.zeros((10, 3)), x[:10]))
