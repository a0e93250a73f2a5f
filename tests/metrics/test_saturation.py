"""Saturation family against numpy: the test accumulates the covariance itself and runs ``eigh``.

Independent reference: a forward hook written here keeps every recorded batch's activations;
the covariance is ``np.cov(rows, bias=True)`` of their concatenation and the eigenvalues come
from ``np.linalg.eigh``. Features per sample are built here with numpy: conv channel-wise,
sequences every time step a sample, for both ``batch_first`` settings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.functional import intrinsic_dimension, saturation
from sonde.metrics import Saturation


def reference(rows: np.ndarray, threshold: float = 0.99, eps: float = 1e-6, top_k: int = 5) -> dict[str, Any]:
    cov = np.cov(rows.astype(np.float64), rowvar=False, bias=True).reshape(rows.shape[1], rows.shape[1])
    lam = np.clip(np.linalg.eigh(cov)[0][::-1], 0, None)
    share = np.cumsum(lam) / lam.sum()
    dim = int(np.argmax(share >= threshold * (1 - 1e-12)) + 1) if lam.sum() > 0 else 0
    return {
        "saturation": dim / rows.shape[1],
        "intrinsic_dim": float(dim),
        "cov_trace": float(np.trace(cov)),
        "cov_logdet": float(np.linalg.slogdet(cov + eps * np.eye(len(cov)))[1]),
        "eigenvalues": lam[:top_k],
    }


@pytest.fixture(autouse=True, params=["host", "device"])
def sums_kept(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the CPU's path (sums in a reused buffer, folded into host state, numpy's
    eigenvalues) and the path a CUDA GPU takes (sums kept as tensors in the state, eigenvalues
    from torch on the sums' device), run here on the CPU."""
    if request.param == "device":
        monkeypatch.setattr(Saturation, "device_types", ("cuda", "cpu"))
    return str(request.param)


#: The float64 product: every output within 1e-6 of numpy's, rank-deficient layers included.
EXACT: dict[str, Any] = {"precision": "float64"}


def assert_matches(collect: Collect, step: int, layer: str, expected: dict[str, Any], phase: str = "train",
                   rtol: float = 1e-6) -> None:
    for name, value in expected.items():
        got = collect.value(step=step, layer=layer, metric=name, phase=phase)
        np.testing.assert_allclose(got, value, rtol=rtol, atol=1e-9, err_msg=f"{name} at step {step}")


def rank_k(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0].T  # k orthonormal directions in d dims
    return rng.standard_normal((n, k)) @ basis + rng.standard_normal(d)


# -- the pure function -------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "k"), [(16, 1), (32, 5), (64, 17), (40, 20)])
def test_rank_k_data_has_intrinsic_dim_k(d: int, k: int) -> None:
    x = rank_k(4 * d, d, k, seed=d + k)
    sat, dim = saturation(np.cov(x, rowvar=False, bias=True), threshold=0.99)
    assert dim == k and sat == pytest.approx(k / d)
    assert saturation(torch.from_numpy(np.cov(x, rowvar=False)), 0.99) == (k / d, k)  # tensors too


def test_all_zero_covariance_has_intrinsic_dim_zero() -> None:
    assert saturation(np.zeros((4, 4))) == (0.0, 0)


def test_bad_inputs_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"square \(d, d\) covariance, got shape \(3, 4\)"):
        saturation(np.zeros((3, 4)))
    with pytest.raises(ConfigError, match=r"threshold= expects a share in \(0, 1\], got 1.5"):
        intrinsic_dimension(np.ones(3), 1.5)
    with pytest.raises(ConfigError, match=r"Saturation\(approximate=\) expects None, 'auto' or 'sketch', got 'fast'"):
        Saturation(approximate="fast")
    with pytest.raises(ConfigError, match=r"Saturation\(precision=\) expects 'float32' or 'float64', got 'half'"):
        Saturation(precision="half")


def test_intrinsic_dim_is_delves_plus_one() -> None:
    """Delve 0.1.50 counts the k whose cumulative share is *below* the threshold (then adds one
    only when the threshold is more than 0.02 above the last such share). On a smooth spectrum,
    where consecutive shares near the threshold differ by less than 0.02, ours is Delve's + 1."""
    import delve.metrics as delve_metrics  # in the test extra: this comparison never skips
    rng = np.random.default_rng(3)
    for d in (24, 48, 96):
        x = rng.standard_normal((2000, d)) * (1.0 / np.arange(1, d + 1) ** 0.7)
        cov = np.cov(x, rowvar=False, bias=True)
        ours = saturation(cov)[1]
        theirs = delve_metrics.compute_intrinsic_dimensionality(torch.from_numpy(cov), thresh=0.99)
        assert theirs > 0 and ours == theirs + 1


# -- through a probe ---------------------------------------------------------------------------


def train_and_keep(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor], metric: Saturation,
                   collect: Collect, eval_batches: dict[int, list[torch.Tensor]] | None = None) -> list[np.ndarray]:
    """Train on ``batches`` (one step each); return the layer's output of every train step."""
    seen: list[np.ndarray] = []
    handle = layer.register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().numpy().copy())
        if m.training and torch.is_grad_enabled() else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with sonde.probe(model, store=None, optimizer=opt, metrics=[metric], sinks=[collect], every=1):
        for step, x in enumerate(batches):
            out = model(x)
            (out[0] if isinstance(out, tuple) else out).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            for xe in (eval_batches or {}).get(step, []):
                with torch.no_grad():
                    model(xe)
    handle.remove()
    return seen


def test_linear_reset_compute_covers_exactly_the_batches_since_the_previous_value(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(int(n), 6, generator=gen) for n in (20, 7, 33, 12, 25, 9, 30)]
    outs = train_and_keep(model, model[0], batches, Saturation(compute_every=3, top_k=4, **EXACT), collect)
    steps = sorted({r.step for r in collect.find(layer="0", metric="saturation")})
    assert steps == [0, 3, 6]
    for step, covered in ((0, [0]), (3, [1, 2, 3]), (6, [4, 5, 6])):
        rows = np.concatenate([outs[s] for s in covered])
        assert_matches(collect, step, "0", reference(rows, top_k=4))
    assert collect.find(layer="0", metric="eigenvalues")[0].value.shape == (4,)


def test_where_the_sums_are_kept(sums_kept: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device path keeps its sums as a tensor in the state and computes the eigenvalues in
    torch; the CPU's folds a reused buffer into a host array at the steps that compute."""
    on_device = []
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: on_device.append(1) or eigvalsh(*a, **k))
    metric = Saturation(compute_every=2, precision="float64", top_k=3)
    rows = torch.randn(2, 20, 3, dtype=torch.float64)
    metric.update(sonde.metrics.Capture(rows[0], layer_type="Linear", step=1))
    gram = metric.state["gram"]
    if sums_kept == "device":
        assert isinstance(gram, torch.Tensor) and metric._acc is None
    else:
        assert gram == 0.0 and metric._pending  # in the buffer until a step that computes
    metric.update(sonde.metrics.Capture(rows[1], layer_type="Linear", step=2))
    assert isinstance(metric.state["gram"], torch.Tensor if sums_kept == "device" else np.ndarray)
    assert metric.staged == []  # nothing for the step's transfer either way
    got = metric.compute()
    np.testing.assert_allclose(got["eigenvalues"], reference(rows.reshape(40, 3).numpy(), top_k=3)["eigenvalues"],
                               rtol=1e-9)
    assert len(on_device) == (1 if sums_kept == "device" else 0)


def test_reset_never_accumulates_every_batch(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(5, 8))
    batches = [torch.randn(10, 5) for _ in range(5)]
    outs = train_and_keep(model, model[0], batches, Saturation(compute_every=2, reset="never", **EXACT), collect)
    for step in (0, 2, 4):
        assert_matches(collect, step, "0", reference(np.concatenate(outs[: step + 1])))


def test_conv_features_are_channel_wise(collect: Collect) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    batches = [torch.randn(4, 3, 7, 6) for _ in range(2)]
    outs = train_and_keep(model, model[0], batches, Saturation(compute_every=2, **EXACT), collect)
    # Every (sample, row, column) is a sample of C features.
    rows = np.concatenate([o.transpose(0, 2, 3, 1).reshape(-1, 8) for o in outs[1:2]])
    assert_matches(collect, 1, "0", reference(rows))
    relu_rows = np.maximum(outs[1], 0).transpose(0, 2, 3, 1).reshape(-1, 8)  # a ReLU after a conv too
    assert_matches(collect, 1, "1", reference(relu_rows))


@pytest.mark.parametrize("module", [nn.LSTM, nn.GRU, nn.RNN])
def test_sequence_every_time_step_is_a_sample_for_both_batch_first(module: type[nn.Module]) -> None:
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(5, 9, 4, generator=gen) for _ in range(3)]  # (B, T, features)
    results = {}
    for batch_first in (True, False):
        torch.manual_seed(0)
        rnn = module(4, 6, batch_first=batch_first)
        model = nn.Sequential(rnn)
        collect = Collect()
        batches = [x if batch_first else x.transpose(0, 1).contiguous() for x in data]
        outs = train_and_keep(model, rnn, batches, Saturation(compute_every=2, **EXACT), collect)
        for o in outs:
            assert o.shape == ((5, 9, 6) if batch_first else (9, 5, 6))
        rows = np.concatenate([o.reshape(-1, 6) for o in outs[1:3]])  # B·T samples of 6 features
        assert len(rows) == 2 * 5 * 9
        assert_matches(collect, 2, "0", reference(rows))
        results[batch_first] = collect.value(step=2, layer="0", metric="cov_trace")
    # Same weights, same data in the two layouts: the same rows, so the same covariance.
    assert results[True] == pytest.approx(results[False], rel=1e-9)


def test_micro_batches_of_one_step_and_eval_kept_apart(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(4, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x1, x2, xe = torch.randn(8, 4), torch.randn(5, 4), torch.randn(11, 4)
    with sonde.probe(model, store=None, optimizer=opt, metrics=[Saturation(compute_every=1, **EXACT)], sinks=[collect]):
        w = model[0].weight.detach().numpy().copy(), model[0].bias.detach().numpy().copy()
        (model(x1).sum() + model(x2).sum()).backward()  # two forwards, one step
        opt.step()
        opt.zero_grad()
        w_after = model[0].weight.detach().numpy().copy(), model[0].bias.detach().numpy().copy()
        with torch.no_grad():
            model(xe)
    train_rows = np.concatenate([x1.numpy() @ w[0].T + w[1], x2.numpy() @ w[0].T + w[1]])
    assert_matches(collect, 0, "0", reference(train_rows))
    assert_matches(collect, 1, "0", reference(xe.numpy() @ w_after[0].T + w_after[1]), phase="eval")


def test_input_topic_on_request(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(5, 3))
    batches = [torch.randn(16, 5) for _ in range(2)]
    train_and_keep(model, model[0], batches, Saturation(compute_every=2, topics=("inputs",), **EXACT), collect)
    assert_matches(collect, 1, "0", reference(batches[1].numpy()))
    assert {r.topic for r in collect.records} == {"inputs"}


# -- the float32 product (the default) and the shift -------------------------------------------


def test_float32_products_match_numpy_within_the_documented_tolerance(collect: Collect) -> None:
    """Default precision: each step's product in float32, accumulated in float64. On full-rank
    features (more rows than features, no dead units) every output is within 1e-5 of numpy's
    float64 reference (measured: ≤ 2e-7 relative), intrinsic_dim exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 3))
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(64, 40, generator=gen) * 2 + 1 for _ in range(6)]
    outs = train_and_keep(model, model[0], batches, Saturation(compute_every=3, threshold=0.9), collect)
    for step, covered in ((0, [0]), (3, [1, 2, 3])):
        expected = reference(np.concatenate([outs[s] for s in covered]), threshold=0.9)
        assert_matches(collect, step, "0", expected, rtol=1e-5)
        assert collect.value(step=step, layer="0", metric="intrinsic_dim") == expected["intrinsic_dim"]


@pytest.mark.parametrize(("precision", "rtol"), [("float64", 1e-9), ("float32", 1e-5)])
def test_a_large_mean_costs_no_precision(precision: str, rtol: float) -> None:
    """Features of mean 1e3 and standard deviation ~1: S/n − mean·meanᵀ would cancel 6 digits;
    centred on the first batch's mean, float64 keeps ~1e-12 and float32 ~1e-6 (measured)."""
    rng = np.random.default_rng(7)
    d = 32
    scale = np.linspace(0.2, 2.0, d)
    chunks = [(rng.standard_normal((96, d)) * scale + 1e3 + 0.05 * i).astype(np.float32) for i in range(5)]
    metric = Saturation(precision=precision, top_k=d)
    for chunk in chunks:
        metric.update(sonde.metrics.Capture(torch.from_numpy(chunk), layer_type="Linear"))
        metric.absorb_staged({id(t): t.numpy() for _, t in metric.staged})
    got = metric.compute()
    expected = reference(np.concatenate(chunks).astype(np.float64), top_k=d)
    for name in ("saturation", "intrinsic_dim", "cov_trace", "cov_logdet", "eigenvalues"):
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, err_msg=name)


def test_merge_recentres_sums_taken_with_another_shift() -> None:
    """Two instances (two ranks) see different first batches, so different shifts; merged, they
    give numpy's covariance of all the rows."""
    rng = np.random.default_rng(8)
    parts = [rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6)) + offset for offset in (0.0, 40.0)]
    metrics = [Saturation(precision="float64", top_k=6) for _ in parts]
    for metric, part in zip(metrics, parts, strict=True):
        for chunk in np.array_split(part, 2):
            metric.update(sonde.metrics.Capture(torch.from_numpy(chunk), layer_type="Linear"))
            metric.absorb_staged({id(t): t.numpy() for _, t in metric.staged})
    assert not np.allclose(metrics[0]._shift_on_host(), metrics[1]._shift_on_host())
    metrics[0].merge(metrics[1])
    got = metrics[0].compute()
    expected = reference(np.concatenate(parts), top_k=6)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-9, err_msg=name)
    fresh = Saturation(precision="float64", top_k=6)  # a never-updated instance adopts the shift
    fresh.merge(metrics[0])
    np.testing.assert_allclose(fresh.compute()["eigenvalues"], expected["eigenvalues"], rtol=1e-9)


# -- the approximate mode ----------------------------------------------------------------------


def test_sketch_error_on_a_known_spectrum_is_bounded() -> None:
    """d = 2048 features with population eigenvalues λ_i = i^-1.5, n = 1024 samples.
    Reference: the exact sample covariance's eigenvalues, from the n×n Gram matrix of the
    centred data (same non-zero spectrum as the d×d covariance). The Nyström sketch of 512
    directions: trace exact, top-5 eigenvalues within 2% (measured 0.08%), intrinsic_dim at
    threshold 0.9 within 10% (measured 41 for 40) and never below the exact one. (Measured at
    0.95: 117 for 107; at 0.99 the exact 427 is too close to 512 and the sketch says NaN.)"""
    d, n = 2048, 1024
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.75 + 3.0
    centred = x - x.mean(axis=0)
    lam = np.clip(np.linalg.eigh(centred @ centred.T / n)[0][::-1], 0, None)
    trace = float(np.sum(centred**2) / n)
    exact_dim = int(np.argmax(np.cumsum(lam) / trace >= 0.9) + 1)
    metric = Saturation(threshold=0.9, approximate="auto", sketch_size=512, top_k=5)
    for chunk in np.array_split(x, 4):
        metric.update(sonde.metrics.Capture(torch.from_numpy(chunk).float(), layer_type="Linear"))
        metric.absorb_staged({id(t): t.numpy() for _, t in metric.staged})
    assert metric.sketching
    got = metric.compute()
    assert got["cov_trace"] == pytest.approx(trace, rel=1e-5)
    np.testing.assert_allclose(got["eigenvalues"], lam[:5], rtol=0.02)
    assert got["intrinsic_dim"] == pytest.approx(exact_dim, rel=0.10)
    assert got["intrinsic_dim"] >= exact_dim  # sketch eigenvalues never over-estimate
    assert got["saturation"] == got["intrinsic_dim"] / d


def test_sketch_that_cannot_reach_the_threshold_says_nan_not_a_guess() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 64))  # isotropic: 0.99 of the variance needs ~63 directions
    metric = Saturation(approximate="sketch", sketch_size=16)
    metric.update(sonde.metrics.Capture(torch.from_numpy(x), layer_type="Linear"))
    metric.absorb_staged({id(t): t.numpy() for _, t in metric.staged})
    got = metric.compute()
    assert np.isnan(got["intrinsic_dim"]) and np.isnan(got["saturation"])
    assert got["cov_trace"] == pytest.approx(np.trace(np.cov(x, rowvar=False, bias=True)), rel=1e-9)
