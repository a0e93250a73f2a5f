"""Tensor statistics (mean, std, var, min, max, abs_mean, norm, zero_frac, nonfinite_frac).

Every value is checked against numpy written here: float64 over the values sonde reduces
(float16/bfloat16/integer tensors are reduced in float32, so the reference is the float32 data
widened to float64). Variance and std are the population ones (ddof=0).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sonde
from collect import Collect
from sonde.functional import EMPTY_SUMMARY, merge_summaries, summarize, summary_stats
from sonde.records import Record

# Every test runs with the compiled kernel and with the torch reductions.
pytestmark = pytest.mark.usefixtures("kernel_or_torch")

STATS = ("mean", "std", "var", "min", "max", "abs_mean", "norm", "zero_frac", "nonfinite_frac")


def numpy_stats(values: np.ndarray) -> dict[str, float]:
    """The reference: float64 numpy over the flattened values."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        return {
            "mean": float(np.mean(x)),
            "std": float(np.std(x, ddof=0)),
            "var": float(np.var(x, ddof=0)),
            "min": float(np.min(x)),
            "max": float(np.max(x)),
            "abs_mean": float(np.mean(np.abs(x))),
            "norm": float(np.linalg.norm(x)),
            "zero_frac": float(np.count_nonzero(x == 0) / x.size),
            "nonfinite_frac": float(np.count_nonzero(~np.isfinite(x)) / x.size),
        }


def assert_stats_match(got: dict[str, float], values: np.ndarray, rtol: float) -> None:
    """Relative tolerance, with an absolute floor scaled by the data for values that cancel to ~0."""
    want = numpy_stats(values)
    assert set(got) == set(STATS)
    finite = np.asarray(values, dtype=np.float64)[np.isfinite(values)]
    scale = float(np.max(np.abs(finite))) if finite.size else 1.0
    floors = {"mean": scale, "std": scale, "var": scale * scale, "abs_mean": scale, "norm": scale}
    for name in STATS:
        g, w = got[name], want[name]
        if math.isnan(w):
            assert math.isnan(g), f"{name}: got {g}, numpy {w}"
        elif math.isinf(w):
            assert g == w, f"{name}: got {g}, numpy {w}"
        elif name in ("zero_frac", "nonfinite_frac", "min", "max"):
            assert g == w, f"{name}: got {g}, numpy {w}"  # exact: counts and extremes round nothing
        else:
            assert g == pytest.approx(w, rel=rtol, abs=rtol * floors[name]), name


def summary_of(t: torch.Tensor) -> np.ndarray:
    """``summarize`` as a host float64 vector (whether it hands back a tensor or an array)."""
    s = summarize(t)
    return s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)


def stats_of(t: torch.Tensor) -> dict[str, float]:
    return summary_stats(summary_of(t))


def as_reduced(t: torch.Tensor) -> np.ndarray:
    """The values sonde reduces: float64 stays, everything else is widened to float32 first."""
    return t.detach().double().numpy() if t.dtype == torch.float64 else t.detach().float().double().numpy()


# -- (a) pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4, 5), (2, 3, 8, 8), (4097,)])
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float64, 1e-9), (torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)],
)
def test_summary_stats_match_numpy(shape: tuple[int, ...], dtype: torch.dtype, rtol: float) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 0.5).to(dtype)
    if t.numel() > 4:
        t.view(-1)[::5] = 0  # some exact zeros
    assert_stats_match(stats_of(t), as_reduced(t), rtol)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool])
def test_integer_tensor_is_reduced_as_float(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(-6, 7, (11, 13), generator=gen)
    t = (t > 0) if dtype == torch.bool else t.to(dtype)
    reference = t.numpy().astype(np.float64)
    assert np.count_nonzero(reference == 0) > 0
    assert_stats_match(stats_of(t), reference, 1e-6)


def test_var_is_population_variance_ddof0_not_unbiased() -> None:
    got = stats_of(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert got["var"] == pytest.approx(1.25, rel=1e-12)  # ddof=0; the unbiased one is 5/3
    assert got["std"] == pytest.approx(math.sqrt(1.25), rel=1e-12)
    assert got["var"] != pytest.approx(np.var([1.0, 2.0, 3.0, 4.0], ddof=1))


def test_zero_frac_counts_exact_zeros_including_negative_zero() -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0, 0.0, 3.0, -1.0])
    got = stats_of(x)
    assert got["zero_frac"] == 3 / 8
    relu = torch.relu(torch.randn(1000, generator=torch.Generator().manual_seed(1)))
    assert stats_of(relu)["zero_frac"] == float(np.count_nonzero(relu.numpy() == 0) / 1000)


def test_large_mean_small_spread_keeps_variance_precision() -> None:
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal(10_000)).astype(np.float32)
    got = stats_of(torch.from_numpy(x))
    reference = x.astype(np.float64)
    assert got["var"] == pytest.approx(np.var(reference), rel=1e-6)
    assert got["std"] == pytest.approx(np.std(reference), rel=1e-6)
    assert got["mean"] == pytest.approx(np.mean(reference), rel=1e-7)
    assert got["norm"] == pytest.approx(np.linalg.norm(reference), rel=1e-6)


def test_large_mean_small_spread_float64_exact() -> None:
    rng = np.random.default_rng(1)
    x = 1e8 + 1e-3 * rng.standard_normal(5000)
    got = stats_of(torch.from_numpy(x))
    assert got["var"] == pytest.approx(np.var(x), rel=1e-7)
    assert got["mean"] == pytest.approx(np.mean(x), rel=1e-12)


NONFINITE_CASES = {
    "nan": [1.0, float("nan"), -2.0, 0.0],
    "nan_first": [float("nan"), 1.0, -2.0, 0.0],
    "pos_inf": [1.0, float("inf"), -2.0, 0.0, 0.0],
    "neg_inf": [1.0, -2.0, float("-inf")],
    "inf_first": [float("inf"), 1.0, -2.0],
    "both_inf": [float("inf"), 3.0, float("-inf"), 0.0],
    "nan_and_inf": [0.0, float("inf"), float("nan"), 2.0, float("-inf"), 5.0],
    "all_nan": [float("nan")] * 3,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", sorted(NONFINITE_CASES))
def test_nonfinite_inputs_follow_numpy(case: str, dtype: torch.dtype) -> None:
    t = torch.tensor(NONFINITE_CASES[case], dtype=dtype)
    values = np.array(NONFINITE_CASES[case])
    got = stats_of(t)
    want = numpy_stats(values)
    assert got["nonfinite_frac"] == np.count_nonzero(~np.isfinite(values)) / values.size
    assert got["zero_frac"] == want["zero_frac"]
    for name in ("mean", "std", "var", "min", "max", "abs_mean", "norm"):
        if math.isnan(want[name]):
            assert math.isnan(got[name]), f"{name}: got {got[name]}, numpy {want[name]}"
        else:
            assert got[name] == pytest.approx(want[name], rel=1e-6), name


def test_nonfinite_in_large_random_tensor() -> None:
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(5))
    x[3, 4] = float("nan")
    x[10, :3] = float("inf")
    got = stats_of(x)
    assert got["nonfinite_frac"] == 4 / x.numel()
    assert math.isnan(got["mean"]) and math.isnan(got["min"]) and math.isnan(got["max"]) and math.isnan(got["norm"])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_empty_tensor_gives_no_statistics(shape: tuple[int, ...]) -> None:
    s = summary_of(torch.empty(shape))
    np.testing.assert_array_equal(s, EMPTY_SUMMARY)
    assert summary_stats(s) == {}
    assert summary_stats(EMPTY_SUMMARY.copy()) == {}


def test_summary_vector_layout() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0], dtype=torch.float16)
    s = summary_of(x)
    assert s.dtype == np.float64 and s.shape == (9,)
    # [n, mean, m2, min, max, abs_sum, zeros, nans, infs]; m2 = sum of squared deviations
    np.testing.assert_allclose(s, [5, 1.2, np.sum((np.array([0, 1, 2, 3, 0]) - 1.2) ** 2), 0, 3, 6, 2, 0, 0], rtol=1e-7)


# -- (b) merging -------------------------------------------------------------------------------


def merged(parts: list[np.ndarray]) -> np.ndarray:
    acc = EMPTY_SUMMARY.copy()
    for part in parts:
        acc = merge_summaries(acc, summary_of(torch.from_numpy(part)))
    return acc


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 400),
    cuts=st.lists(st.floats(0, 1), max_size=8),
    loc=st.sampled_from([0.0, -3.0, 50.0]),
)
def test_merge_equals_numpy_over_concatenation(seed: int, size: int, cuts: list[float], loc: float) -> None:
    rng = np.random.default_rng(seed)
    data = loc + rng.standard_normal(size) * rng.uniform(0.1, 10)
    data[rng.random(size) < 0.1] = 0.0
    points = sorted(int(c * size) for c in cuts)
    parts = np.split(data, points)  # may include empty batches
    assert_stats_match(summary_stats(merged(parts)), data, 1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 300), min_size=1, max_size=5))
def test_merge_of_float32_batches_equals_numpy(seed: int, cuts: list[int]) -> None:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(300) * 2 + 1).astype(np.float32)
    parts = np.split(data, sorted(cuts))
    assert_stats_match(summary_stats(merged(parts)), data.astype(np.float64), 1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_merge_is_order_independent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b, c = (summary_of(torch.from_numpy(rng.standard_normal(rng.integers(1, 50)))) for _ in range(3))
    left = merge_summaries(merge_summaries(a, b), c)
    right = merge_summaries(a, merge_summaries(c, b))
    np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-12)


def test_merge_propagates_nan_and_counts_nonfinite() -> None:
    parts = [np.array([1.0, 2.0]), np.array([np.nan, 0.0, np.inf]), np.array([-5.0])]
    got = summary_stats(merged(parts))
    assert math.isnan(got["min"]) and math.isnan(got["max"]) and math.isnan(got["mean"])
    assert got["nonfinite_frac"] == 2 / 6
    assert got["zero_frac"] == 1 / 6


def test_merge_with_empty_summary_is_identity() -> None:
    s = summary_of(torch.tensor([1.0, 4.0]))
    np.testing.assert_array_equal(merge_summaries(EMPTY_SUMMARY.copy(), s), s)
    np.testing.assert_array_equal(merge_summaries(s, EMPTY_SUMMARY.copy()), s)


def test_merge_of_large_mean_batches_keeps_variance_precision() -> None:
    # Each batch mean must reach the merge in float64: a float32 mean (ulp 1e-3 at 1e4) would add
    # its rounding to m2 through Chan's delta term and put var off by ~4e-4 relative.
    rng = np.random.default_rng(0)
    data = (1e4 + 1e-2 * rng.standard_normal(10_000)).astype(np.float32)
    got = summary_stats(merged(np.array_split(data, 7)))
    assert got["var"] == pytest.approx(np.var(data.astype(np.float64)), rel=1e-6)


# -- (c) end to end through a probe ------------------------------------------------------------


def _model() -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def _by_key(records: list[Record], phase: str = "train") -> dict[tuple[int, str, str], dict[str, float]]:
    out: dict[tuple[int, str, str], dict[str, float]] = {}
    for r in records:
        if r.phase == phase:
            out.setdefault((r.step, r.layer, r.topic), {})[r.metric] = r.value
    return out


def test_probe_activations_inputs_weights_and_grads_match_numpy() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    step = [0]

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[(step[0], name, "activations")] = output.detach().clone().double().numpy()

        return hook

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[(step[0], name, "inputs")] = args[0].detach().clone().double().numpy()

        return hook

    for name, module in model.named_children():
        module.register_forward_pre_hook(pre_hook(name))
        module.register_forward_hook(forward_hook(name))

    sink = Collect()
    topics = ["activations", "inputs", "weights", "biases", "weight_grads", "bias_grads"]
    gen = torch.Generator().manual_seed(7)
    with sonde.probe(model, store=None, optimizer=opt, sinks=[sink], metrics=list(STATS), topics=topics):
        for k in range(3):
            step[0] = k
            x = torch.randn(16, 5, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            for layer in ("0", "2", "4"):
                module = model[int(layer)]
                seen[(k, layer, "weights")] = module.weight.detach().double().numpy().copy()
                seen[(k, layer, "biases")] = module.bias.detach().double().numpy().copy()
                seen[(k, layer, "weight_grads")] = module.weight.grad.double().numpy().copy()
                seen[(k, layer, "bias_grads")] = module.bias.grad.double().numpy().copy()
            opt.step()

    got = _by_key(sink.records)
    assert set(got) == set(seen), set(got) ^ set(seen)
    assert len(got) == 3 * (5 * 2 + 3 * 4)
    for key, values in seen.items():
        assert_stats_match(got[key], values, 1e-5)
    # The inplace ReLU overwrote layer 0's output after it was captured: sonde saw the pre-ReLU values.
    assert got[(0, "0", "activations")]["min"] < 0
    assert got[(0, "1", "activations")]["min"] == 0 and got[(0, "1", "activations")]["zero_frac"] > 0
    # Weights change across steps, so the step attribution is really tested.
    assert got[(1, "0", "weights")]["norm"] != got[(0, "0", "weights")]["norm"]


def test_probe_eval_batches_merge_into_one_value() -> None:
    model = _model()
    sink = Collect()
    batches = [torch.randn(n, 5, generator=torch.Generator().manual_seed(n)) for n in (3, 10, 6)]
    outputs: dict[str, list[np.ndarray]] = {"0": [], "2": [], "4": []}
    for name in outputs:
        model[int(name)].register_forward_hook(
            lambda m, a, out, name=name: outputs[name].append(out.detach().clone().double().numpy())
        )
    with sonde.probe(model, store=None, sinks=[sink], metrics=list(STATS), topics=["activations"]):
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    got = _by_key(sink.records, phase="eval")
    assert {layer for _, layer, _ in got} == {"0", "1", "2", "3", "4"}
    assert {step for step, _, _ in got} == {0}
    for name, parts in outputs.items():
        assert_stats_match(got[(0, name, "activations")], np.concatenate(parts), 1e-5)
