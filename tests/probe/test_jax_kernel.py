"""``sonde.probe.jax_kernel``: the statistics kernel as an XLA custom call inside a jitted step,
checked against numpy on the same arrays: the ten raw partials, the histogram over given edges,
over the tensor's own range, or none; a difference (``x - minus``); NaN and Inf; and, through the
probe, a block's weights merged under ``depth=`` whose histogram counts over the first tensor's range."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from collect import Collect

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import sonde.jax  # noqa: E402
from sonde.probe import jax_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the custom call is registered for the CPU")


def _counts(value: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """numpy's counts over ``bins`` equal bins of [lo, hi] (float32 arithmetic, as the kernel's
    bins are defined), outside values in the end bins, NaN left out."""
    v = value.ravel().astype(np.float32)
    v = v[~np.isnan(v)]
    scale = np.float32(bins) / (np.float32(hi) - np.float32(lo))
    position = np.clip((v - np.float32(lo)) * scale, 0, bins - 1)
    return np.bincount(position.astype(np.int64), minlength=bins)


def _check(raw: np.ndarray, value: np.ndarray) -> None:
    """The ten partials (n, shift, s1, s2, min, max, abs_sum, nonzeros, nans, infs) against numpy."""
    v = value.ravel().astype(np.float64)
    finite = v[np.isfinite(v)]
    assert raw[0] == v.size
    assert raw[1] == (v[0] if np.isfinite(v[0]) else 0.0)
    assert raw[7:].tolist() == [np.count_nonzero(v), np.isnan(v).sum(), np.isinf(v).sum()]
    if finite.size == v.size:
        assert (raw[4], raw[5]) == (v.min(), v.max())
        assert raw[1] + raw[2] / raw[0] == pytest.approx(v.mean(), rel=1e-5, abs=1e-7)
        centred = v - raw[1]
        assert raw[3] == pytest.approx((centred * centred).sum(), rel=1e-5)
        assert raw[6] == pytest.approx(np.abs(v).sum(), rel=1e-5)


def test_partials_and_histograms_in_a_jitted_step_match_numpy() -> None:
    assert jax_kernel.available()  # the test machine has a C compiler
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 0.5, size=(300, 257)).astype(np.float32)  # not a multiple of the vector width
    before = rng.normal(size=x.shape).astype(np.float32)
    x[0, :7] = 0.0
    jnp = jax.numpy
    given = jnp.asarray([1.0, 1.0, 3.0, 64 / 2.0], jnp.float32)
    unknown = jnp.zeros(4, jnp.float32)

    @jax.jit
    def step(x: Any, before: Any) -> Any:
        y = x * 1.0  # an array the step computes, read in place
        return (jax_kernel.partials(y, None, given, 64), jax_kernel.partials(y, None, unknown, 16),
                jax_kernel.partials(y, before, unknown, 0), jax_kernel.extremes(jax_kernel.partials(y, None, given, 8)),
                jax_kernel.partials(y, None, given, 8, wanted=x[0, 0] > 100))  # a step not recorded

    over_given, over_own, difference, (lo, hi), skipped = step(x, before)
    assert not np.asarray(skipped).any()  # reads nothing, returns zeros
    raw, counts = jax_kernel.unpack(over_given)
    _check(raw, x)
    np.testing.assert_array_equal(counts, _counts(x, 1.0, 3.0, 64))
    raw, counts = jax_kernel.unpack(over_own)
    _check(raw, x)
    np.testing.assert_array_equal(counts, _counts(x, float(x.min()), float(x.max()), 16))
    raw, counts = jax_kernel.unpack(difference)
    _check(raw, x - before)
    assert counts.size == 0
    assert (float(lo), float(hi)) == (float(x.min()), float(x.max()))


def test_nan_and_inf_are_counted_and_left_out_of_the_bins() -> None:
    x = np.linspace(-1.0, 1.0, 70000, dtype=np.float32)  # more than one thread's share
    x[[5, 600, 69000]] = [np.nan, np.inf, -np.inf]
    words = jax.jit(lambda v: jax_kernel.partials(v, None, jax.numpy.asarray([1.0, -1.0, 1.0, 5.0]), 10))(x)
    raw, counts = jax_kernel.unpack(words)
    _check(raw, x)
    np.testing.assert_array_equal(counts, _counts(x, -1.0, 1.0, 10))
    assert counts.sum() == x.size - 1  # every element but the NaN, infinities in the end bins
    raw, counts = jax_kernel.unpack(jax.jit(lambda v: jax_kernel.partials(v, None, np.zeros(4, np.float32), 8))(
        np.full(100, 2.5, np.float32)))
    _check(raw, np.full(100, 2.5))
    assert counts.tolist() == [0] * 8  # a constant tensor spans no range: no counts


def test_tensors_the_kernel_does_not_take_are_reduced_only_on_recorded_steps(collect: Collect) -> None:
    """bfloat16 activations go to ``jnp`` reductions in a branch of their own, beside the kernel's
    float32 tensors, on the steps ``every=`` records."""
    jnp = jax.numpy

    class Half(nnx.Module):  # type: ignore[misc]
        def __init__(self, rngs: Any) -> None:
            self.fc = nnx.Linear(4, 3, dtype=jnp.bfloat16, rngs=rngs)  # float32 weights, bfloat16 output

        def __call__(self, x: Any) -> Any:
            return self.fc(x)

    model = Half(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    xs = [np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4) * (k + 1) for k in range(3)]

    @nnx.jit  # type: ignore[misc]
    def step(model: Any, optimizer: Any, x: Any) -> Any:
        def loss(m: Any) -> Any:
            out = m(x)
            return (out.astype(jnp.float32) ** 2).mean(), out

        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        optimizer.update(model, grads)
        return out

    with sonde.jax.probe(model, optimizer=optimizer, every=2, store=None, sinks=[collect],
                         metrics=["mean", "max"]):
        outputs = [np.asarray(step(model, optimizer, x).astype(jnp.float32)) for x in xs]
    assert sorted({r.step for r in collect.records}) == [0, 2]
    for k in (0, 2):
        find = {"step": k, "layer": "fc", "topic": "activations"}
        assert collect.value(**find, metric="mean") == pytest.approx(float(outputs[k].mean()), rel=1e-3, abs=1e-3)
        assert collect.value(**find, metric="max") == pytest.approx(float(outputs[k].max()), rel=1e-6)


class _Block(nnx.Module):  # type: ignore[misc]
    def __init__(self, rngs: Any) -> None:
        self.a = nnx.Linear(6, 6, rngs=rngs)
        self.b = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.b(nnx.relu(self.a(x)))


class _Deep(nnx.Module):  # type: ignore[misc]
    def __init__(self, rngs: Any) -> None:
        self.block = _Block(rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.head(self.block(x))


def test_merged_weights_count_over_the_first_tensors_range(collect: Collect) -> None:
    """``depth=1`` merges the block's two kernels: one histogram over the first kernel's range
    (later values in the end bins), and statistics of both together, all taken in the step."""
    model = _Deep(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    kernels = [np.asarray(model.block.a.kernel.get_value()), np.asarray(model.block.b.kernel.get_value())]
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)

    @nnx.jit  # type: ignore[misc]
    def step(model: Any, optimizer: Any, x: Any) -> None:
        optimizer.update(model, nnx.grad(lambda m: (m(x) ** 2).mean())(model))

    with sonde.jax.probe(model, optimizer=optimizer, depth=1, store=None, sinks=[collect],
                         metrics=["mean", "max", "histogram"]):
        step(model, optimizer, x)
    merged = np.concatenate([k.ravel() for k in kernels])
    find = {"step": 0, "layer": "block", "topic": "weights"}
    assert collect.value(**find, metric="mean") == pytest.approx(float(merged.mean()), rel=1e-5)
    assert collect.value(**find, metric="max") == pytest.approx(float(merged.max()), rel=1e-6)
    first = kernels[0]
    expected = _counts(first, float(first.min()), float(first.max()), 64) + _counts(
        kernels[1], float(first.min()), float(first.max()), 64)
    np.testing.assert_array_equal(collect.value(**find, metric="histogram"), expected)
