"""The fused CPU kernel (``sonde.functional.native``) against numpy, and against the torch path.

The kernel returns the raw partials of ``summarize_raw`` and histogram counts in one pass,
over a difference ``x - y`` or while copying ``x``, split over threads for large inputs.
Every partial is checked against numpy here; the bin rule is numpy's float32 arithmetic:
``clip((v - lo) * scale, 0, bins - 1)`` truncated, NaN not counted.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.functional import native
from sonde.metrics import Histogram
from sonde.metrics.base import Capture, Metric

SIZES = [1, 15, 16, 17, 2047, 2048, 2049, 70_001, (1 << 18) + 5]


def reference_raw(v: np.ndarray) -> dict[str, float]:
    x = v.astype(np.float64)
    first = float(v[0])
    shift = first if math.isfinite(first) else 0.0
    finite = x[np.isfinite(x)]
    nans = int(np.isnan(x).sum())
    with np.errstate(invalid="ignore", over="ignore"):
        return {
            "n": float(x.size), "shift": shift, "s1": float((x - shift).sum()),
            "s2": float(((x - shift) ** 2).sum()),
            "min": float(np.min(x)) if not nans else math.nan, "max": float(np.max(x)) if not nans else math.nan,
            "abs_sum": float(np.abs(x).sum()), "nonzeros": float(np.count_nonzero(x)), "nans": float(nans),
            "infs": float(np.isinf(x).sum()), "scale": float(np.abs(finite).max()) if finite.size else 1.0,
        }


def reference_counts(v: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    v = v[~np.isnan(v)].astype(np.float32)
    position = (v - np.float32(lo)) * np.float32(bins / (hi - lo))
    return np.bincount(np.clip(position, 0, bins - 1).astype(np.int64), minlength=bins)


def check_raw(raw: np.ndarray, v: np.ndarray) -> None:
    want = reference_raw(v)
    names = ("n", "shift", "s1", "s2", "min", "max", "abs_sum", "nonzeros", "nans", "infs")
    got = dict(zip(names, raw, strict=True))
    for name in ("n", "shift", "nonzeros", "nans", "infs"):
        assert got[name] == want[name], name
    for name in ("min", "max"):
        assert (math.isnan(got[name]) and math.isnan(want[name])) or got[name] == want[name], name
    if want["infs"] or want["nans"]:
        return  # the sums are not finite; the counts say why
    n, scale = want["n"], want["scale"]
    assert got["s1"] == pytest.approx(want["s1"], rel=1e-5, abs=1e-5 * n * scale)
    assert got["s2"] == pytest.approx(want["s2"], rel=1e-5, abs=1e-6 * n * scale * scale)
    assert got["abs_sum"] == pytest.approx(want["abs_sum"], rel=1e-5)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # large inputs take the threaded path
    yield
    torch.set_num_threads(before)


def test_kernel_builds_where_a_c_compiler_exists() -> None:
    if os.environ.get("SONDE_NATIVE") == "0":
        pytest.skip("SONDE_NATIVE=0 turns the kernel off")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine: sonde uses torch reductions")
    assert native.available()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["plain", "minus", "copy"])
def test_partials_and_histogram_match_numpy(n: int, mode: str) -> None:
    if not native.available():
        pytest.skip("the kernel is not available here")
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 2 + 0.25
    x[::7] = 0.0
    y = torch.randn(n, generator=gen)
    copy = torch.full((n,), 123.0)
    kw = {"minus": y} if mode == "minus" else {"copy_to": copy} if mode == "copy" else {}
    result = native.summarize(x, histogram=(-3.0, 3.5, 64), **kw)
    assert result is not None
    raw, counts = result
    v = (x - y).numpy() if mode == "minus" else x.numpy()
    check_raw(raw, v)
    np.testing.assert_array_equal(counts, reference_counts(v, -3.0, 3.5, 64))
    if mode == "copy":
        assert torch.equal(copy, x)
    if mode == "minus":
        assert torch.equal(y, y.clone())  # the operands are left alone


@pytest.mark.parametrize("bins", [1, 2, 7, 32, 33, 63, 64])
@pytest.mark.parametrize("n", [5, 4096, 300_001])
def test_end_bins_nan_and_inf(bins: int, n: int) -> None:
    if not native.available():
        pytest.skip("the kernel is not available here")
    rng = np.random.default_rng(bins * n)
    v = (rng.standard_normal(n) * 3).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -100.0, 100.0], dtype=np.float32)
    v[rng.integers(0, n, size=min(n, 40))] = rng.choice(specials, size=min(n, 40))
    raw, counts = native.summarize(torch.from_numpy(v), histogram=(-2.0, 2.0, bins))
    check_raw(raw, v)
    np.testing.assert_array_equal(counts, reference_counts(v, -2.0, 2.0, bins))
    assert counts.sum() == n - np.isnan(v).sum()


def test_permuted_dense_layouts_are_read_in_place() -> None:
    """A channels_last activation is one dense block: the kernel reads it without a copy."""
    if not native.available():
        pytest.skip("the kernel is not available here")
    x = torch.randn(4, 8, 5, 6).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    raw, counts = native.summarize(x, histogram=(-2.0, 2.0, 16))
    v = x.numpy().reshape(-1)  # numpy follows the logical order; a summary does not depend on it
    want = reference_raw(v)
    assert (raw[4], raw[5], raw[7]) == (want["min"], want["max"], want["nonzeros"])
    assert raw[6] == pytest.approx(want["abs_sum"], rel=1e-6)
    np.testing.assert_array_equal(counts, reference_counts(v, -2.0, 2.0, 16))


def test_the_torch_path_is_used_where_the_kernel_does_not_apply() -> None:
    x = torch.randn(64, 32)
    assert native.summarize(x.double()) is None
    assert native.summarize(x[:, ::2]) is None  # not dense
    assert native.summarize(x.t(), copy_to=torch.empty(64 * 32)) is None  # a copy needs the logical order
    assert native.summarize(torch.empty(0)) is None
    assert native.summarize(x, histogram=(0.0, 1.0, 65)) is None  # more bins than the kernel counts
    assert native.summarize(x, minus=torch.randn(32, 64)) is None  # shapes differ


class Materialise(Metric):
    """A metric that reads the captured tensor itself (not the summary)."""

    name = "materialise"
    topics = ("weight_updates",)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=0.0, reduce="sum")

    def update(self, capture: Capture) -> None:
        self.stage("total", capture.tensor.detach().double().abs().sum())

    def compute(self) -> dict[str, float]:
        return {"materialise": float(self.state["total"])}


@pytest.mark.parametrize("bins", [64, 100])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_probe_updates_weights_and_histograms_match_numpy(use_kernel: bool, bins: int) -> None:
    """Weights (copied into the snapshot in the fused pass), updates (read as after − before) and
    their histograms, with and without the kernel, against numpy on tensors saved by the test.
    100 bins are more than the kernel counts: torch counts them, the kernel still summarises."""
    with contextlib.nullcontext() if use_kernel else native.disabled():
        _check_probe_against_numpy(bins)


def _check_probe_against_numpy(bins: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 300), torch.randint(0, 5, (64,))
    sink = Collect()
    saved: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    metrics = ["mean", "norm", "abs_mean", Histogram(bins=bins), Materialise()]
    with sonde.probe(model, optimizer=opt, store=None, sinks=[sink], metrics=metrics, layers=["0"]):
        for step in range(3):
            before = model[0].weight.detach().clone().numpy()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            saved[step] = (before, model[0].weight.detach().clone().numpy())
            opt.zero_grad()
    values = {(r.step, r.topic, r.metric): r.value for r in sink.records if r.layer == "0" and r.phase == "train"}
    edges = {t: values[(0, t, "histogram_edges")] for t in ("weights", "weight_updates")}
    for step, (before, after) in saved.items():
        update = (after - before).astype(np.float64)
        for topic, v in (("weights", before.astype(np.float64)), ("weight_updates", update)):
            assert values[(step, topic, "mean")] == pytest.approx(v.mean(), rel=1e-4, abs=1e-7)
            assert values[(step, topic, "norm")] == pytest.approx(np.linalg.norm(v), rel=1e-5)
            assert values[(step, topic, "abs_mean")] == pytest.approx(np.abs(v).mean(), rel=1e-5)
            e = edges[topic]
            assert len(e) == bins + 1
            want, _ = np.histogram(np.clip(v, e[0], e[-1]), bins=e)
            got = values[(step, topic, "histogram")]
            assert got.sum() == v.size
            assert np.abs(got - want).sum() <= 2  # float32 bin arithmetic vs float64 edges at a boundary
        assert values[(step, "weight_updates", "materialise")] == pytest.approx(np.abs(update).sum(), rel=1e-5)


@pytest.mark.parametrize("variant", ["channels_last", "bfloat16"])
def test_layouts_and_dtypes_the_kernel_does_not_take_fall_back_per_tensor(variant: str) -> None:
    """A channels_last convolution (its weight is not contiguous: no fused copy or difference) and a
    bfloat16 model (no kernel at all) still record weights and updates that match numpy."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(16, 3, 8, 8)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
    else:
        model = model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    y = torch.randint(0, 4, (16,))
    sink = Collect()
    saved = []
    with sonde.probe(model, optimizer=opt, store=None, sinks=[sink], metrics=["mean", "norm"], layers=["0"]):
        for _ in range(2):
            before = model[0].weight.detach().float().clone().numpy()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()
            saved.append((before, model[0].weight.detach().float().clone().numpy()))
            opt.zero_grad()
    values = {(r.step, r.topic, r.metric): r.value for r in sink.records if r.layer == "0" and r.phase == "train"}
    for step, (before, after) in enumerate(saved):
        update = after.astype(np.float64) - before.astype(np.float64)
        assert values[(step, "weights", "norm")] == pytest.approx(np.linalg.norm(before), rel=1e-5)
        # exact: a bfloat16 update is taken in float32, where the difference of two bfloat16 values fits
        assert values[(step, "weight_updates", "norm")] == pytest.approx(np.linalg.norm(update), rel=1e-5)
        assert values[(step, "weight_updates", "mean")] == pytest.approx(update.mean(), rel=1e-5, abs=1e-9)
