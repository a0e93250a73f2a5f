"""An empty batch (0 rows) contributes nothing to any metric, and is no failure.

Every built-in metric that reads training batches runs through a probe on a model called with a
batch of 0 rows (alone in a step, and beside a real batch in another); the expected values of the
step that mixes both are computed here with numpy from the real batch alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde import functional as F
from sonde.metrics import registry

#: Metrics that read a fixed probe set or a held-out loader, never the training batches.
NOT_ON_BATCHES = {"cka", "svcca", "cka_matrix", "test_accuracy"}


def test_every_metric_takes_a_batch_of_zero_rows(kernel_or_torch: str, collect: Collect,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    names = sorted(set(registry()) - NOT_ON_BATCHES)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen: dict[int, list[torch.Tensor]] = {}  # layer 0's outputs, by step
    now = {"step": 0}
    model[0].register_forward_hook(lambda _m, _i, out: seen.setdefault(now["step"], []).append(out.detach().clone()))
    with caplog.at_level(logging.ERROR, logger="sonde"), sonde.probe(
            model, store=None, optimizer=opt, metrics=names, every=1, sinks=[collect]) as p:
        # Step 0 fixes the histogram's edges; step 1 has a real and an empty batch; step 2 only an empty one.
        for step, sizes in enumerate([(6,), (6, 0), (0,), (6,)]):
            now["step"] = step
            for rows in sizes:
                x, y = torch.randn(rows, 4), torch.randint(0, 3, (rows,))
                out = model(x)
                loss = nn.functional.cross_entropy(out, y, reduction="sum")  # 0 for an empty batch, not NaN
                loss.backward()
                p.log(loss=loss, labels=y, outputs=out)
            opt.step()
            opt.zero_grad()
    assert [r.getMessage() for r in caplog.records if r.name == "sonde"] == []
    real = torch.cat(seen[1]).double().numpy()
    assert real.shape == (6, 8)  # the empty batch's output joined nothing
    assert collect.value(step=1, layer="0", topic="activations", metric="mean") == pytest.approx(real.mean())
    assert collect.value(step=1, layer="0", topic="activations", metric="std") == pytest.approx(real.std())
    counts = collect.value(step=1, layer="0", topic="activations", metric="histogram")
    assert np.sum(counts) == real.size
    assert collect.find(step=2, layer="0", topic="activations", metric="mean") == []  # nothing made up
    correct = collect.value(step=1, layer="", topic="outputs", metric="train_accuracy")
    assert 0.0 <= correct <= 1.0
    emitted = {r.metric for r in collect.records}
    assert {"saturation", "spectral_norm", "snapshot", "probe_f1", "cluster_mi", "histogram"} <= emitted


def test_functional_kernels_take_an_empty_tensor(kernel_or_torch: str) -> None:
    empty = torch.empty(0, 8)
    summary = F.summarize(empty)
    assert np.array_equal(summary, F.EMPTY_SUMMARY) and F.summary_stats(summary) == {}
    some = F.summarize(torch.arange(4.0))
    assert np.array_equal(F.merge_summaries(some, summary), some)
    assert np.array_equal(F.finish_summary(np.array(F.summarize_raw(empty), dtype=np.float64)), F.EMPTY_SUMMARY)
    assert F.histogram_counts(empty, 0.0, 1.0, 8).tolist() == [0] * 8
    assert F.histogram_counts(empty, torch.tensor(0.0), torch.tensor(1.0), 8).tolist() == [0] * 8
    assert F.accuracy_counts(torch.empty(0, 3), torch.empty(0, dtype=torch.long)).tolist() == [0.0, 0.0]
    xtx, total, n = F.covariance_sums(empty)
    assert n == 0 and float(xtx.abs().sum()) == 0.0 and float(total.abs().sum()) == 0.0
    assert tuple(F.feature_rows(torch.empty(0, 8, 4, 4), "Conv2d").shape) == (0, 8)
    rows, labels = F.task_samples(empty, torch.empty(0, dtype=torch.long))
    assert rows.shape == (0, 8) and labels.shape == (0,)
    rows, labels = F.task_samples(torch.empty(0, 5, 8), torch.empty(0, 5, dtype=torch.long))
    assert rows.shape == (0, 8) and labels.shape == (0,)
    assert F.gram(np.empty((0, 8))).shape == (0, 0)
