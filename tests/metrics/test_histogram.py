"""``histogram``: edges fixed at the first recorded step, counts checked against ``np.histogram``.

Reference: edges = ``np.linspace(min, max, bins + 1)`` of the first recorded step whose values are
finite and not all equal; counts = ``np.histogram`` of the values clipped into
``[edges[0], edges[-1]]`` (outside values go to the end bins), NaN dropped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.functional import histogram_counts, histogram_edges
from sonde.metrics import Histogram
from sonde.records import Record

# Every test runs with the compiled kernel and with the torch reductions.
pytestmark = pytest.mark.usefixtures("kernel_or_torch")


def reference_edges(values: np.ndarray, bins: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.linspace(v.min(), v.max(), bins + 1)


def reference_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    return counts.astype(np.float64)


def histograms(records: list[Record], layer: str, topic: str, metric: str) -> dict[int, np.ndarray]:
    out = {}
    for r in records:
        if (r.layer, r.topic, r.metric, r.phase) == (layer, topic, metric, "train"):
            assert r.step not in out, f"two {metric} records at step {r.step}"
            out[r.step] = r.value
    return out


# -- the pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [1, 2, 8, 64, 255, 256, 257, 300])
def test_histogram_counts_match_numpy(bins: int) -> None:
    rng = np.random.default_rng(bins)
    first = rng.standard_normal(2000).astype(np.float32)
    edges = histogram_edges(float(first.min()), float(first.max()), bins)
    assert edges is not None
    np.testing.assert_array_equal(edges, reference_edges(first, bins))
    for values in (first, (rng.standard_normal(3000) * 1.7 + 0.3).astype(np.float32)):
        got = histogram_counts(torch.from_numpy(values), float(edges[0]), float(edges[-1]), bins)
        np.testing.assert_array_equal(got.double().numpy(), reference_counts(values, edges))


def test_histogram_counts_end_bins_and_nan() -> None:
    values = np.array([-np.inf, -5.0, 0.0, 0.25, 0.5, 1.0, 7.0, np.inf, np.nan, np.nan], dtype=np.float32)
    got = histogram_counts(torch.from_numpy(values), 0.0, 1.0, 4).double().numpy()
    np.testing.assert_array_equal(got, reference_counts(values, np.linspace(0.0, 1.0, 5)))
    np.testing.assert_array_equal(got, [3.0, 1.0, 1.0, 3.0])  # -inf, -5, 0 | 0.25 | 0.5 | 1, 7, +inf
    assert got.sum() == 8  # the two NaN are not counted


@pytest.mark.parametrize(("lo", "hi"), [(1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_histogram_edges_refuse_empty_or_nonfinite_range(lo: float, hi: float) -> None:
    assert histogram_edges(lo, hi, 8) is None


# -- through a probe ---------------------------------------------------------------------------


def test_parameter_histograms_keep_first_edges_and_defer_constant_bias() -> None:
    bins = 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    nn.init.zeros_(model[0].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weights, biases = [], []
    sink = Collect()
    gen = torch.Generator().manual_seed(1)
    with sonde.probe(
        model, store=None, optimizer=opt, sinks=[sink], metrics=[Histogram(bins=bins)], topics=["weights", "biases"]
    ):
        for _ in range(4):
            x = torch.randn(32, 6, generator=gen)
            loss = (model(x) - 3.0).pow(2).mean() * 5
            opt.zero_grad()
            loss.backward()
            weights.append(model[0].weight.detach().double().numpy().copy())
            biases.append(model[0].bias.detach().double().numpy().copy())
            opt.step()

    # Weights: edges from step 0, kept for every later step.
    edges = histograms(sink.records, "0", "weights", "histogram_edges")
    assert list(edges) == [0]
    np.testing.assert_array_equal(edges[0], reference_edges(weights[0], bins))
    counts = histograms(sink.records, "0", "weights", "histogram")
    assert sorted(counts) == [0, 1, 2, 3]
    first = edges[0]
    for step, w in enumerate(weights):
        np.testing.assert_array_equal(counts[step], reference_counts(w, first))
        assert counts[step].sum() == w.size
    # The updates pushed values outside the first range, so the end bins really were exercised.
    assert any(((w < first[0]) | (w > first[-1])).any() for w in weights[1:])
    assert not np.array_equal(counts[3], counts[0])

    # Bias: all zeros at step 0, so its edges wait for step 1.
    bias_edges = histograms(sink.records, "0", "biases", "histogram_edges")
    assert list(bias_edges) == [1]
    np.testing.assert_array_equal(bias_edges[1], reference_edges(biases[1], bins))
    bias_counts = histograms(sink.records, "0", "biases", "histogram")
    assert sorted(bias_counts) == [1, 2, 3]
    for step in (1, 2, 3):
        np.testing.assert_array_equal(bias_counts[step], reference_counts(biases[step], bias_edges[1]))


def _identity_run(batches: list[torch.Tensor], bins: int | None = 16) -> list[Record]:
    model = nn.Sequential(nn.Identity())
    sink = Collect()
    metric = "histogram" if bins is None else Histogram(bins=bins)
    with sonde.probe(model, store=None, sinks=[sink], metrics=[metric], topics=["activations"]):
        for x in batches:
            model(x)
    return sink.records


def test_activation_histogram_out_of_range_inf_and_nan() -> None:
    gen = torch.Generator().manual_seed(4)
    step0 = torch.randn(500, generator=gen)
    step1 = torch.randn(400, generator=gen) * 3
    step1[:5] = float("nan")
    step1[5:8] = float("inf")
    step1[8:10] = float("-inf")
    step2 = torch.randn(20, 30, generator=gen) + 10.0  # entirely above the first range
    records = _identity_run([step0, step1, step2])

    edges = histograms(records, "0", "activations", "histogram_edges")
    assert list(edges) == [0]
    np.testing.assert_array_equal(edges[0], reference_edges(step0.numpy(), 16))
    counts = histograms(records, "0", "activations", "histogram")
    assert sorted(counts) == [0, 1, 2]
    for step, x in enumerate((step0, step1, step2)):
        np.testing.assert_array_equal(counts[step], reference_counts(x.numpy(), edges[0]))
    assert counts[1].sum() == 395  # NaN not counted, ±Inf in the end bins
    assert counts[2][-1] == 600 and counts[2][:-1].sum() == 0


def test_constant_first_steps_defer_edge_selection() -> None:
    gen = torch.Generator().manual_seed(5)
    later = torch.randn(300, generator=gen)
    after = torch.randn(300, generator=gen) * 2
    records = _identity_run([torch.full((50,), 2.0), torch.zeros(50), later, after])
    edges = histograms(records, "0", "activations", "histogram_edges")
    assert list(edges) == [2]
    np.testing.assert_array_equal(edges[2], reference_edges(later.numpy(), 16))
    counts = histograms(records, "0", "activations", "histogram")
    assert sorted(counts) == [2, 3]
    np.testing.assert_array_equal(counts[2], reference_counts(later.numpy(), edges[2]))
    np.testing.assert_array_equal(counts[3], reference_counts(after.numpy(), edges[2]))


def test_nonfinite_first_step_defers_edge_selection() -> None:
    gen = torch.Generator().manual_seed(6)
    bad = torch.randn(100, generator=gen)
    bad[7] = float("nan")
    good = torch.randn(100, generator=gen)
    records = _identity_run([bad, good])
    edges = histograms(records, "0", "activations", "histogram_edges")
    assert list(edges) == [1]
    np.testing.assert_array_equal(edges[1], reference_edges(good.numpy(), 16))
    np.testing.assert_array_equal(
        histograms(records, "0", "activations", "histogram")[1], reference_counts(good.numpy(), edges[1])
    )


def test_default_bins_by_name() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(8))
    records = _identity_run([x], bins=None)
    edges = histograms(records, "0", "activations", "histogram_edges")[0]
    assert edges.shape == (65,)
    counts = histograms(records, "0", "activations", "histogram")[0]
    np.testing.assert_array_equal(counts, reference_counts(x.numpy(), reference_edges(x.numpy(), 64)))
