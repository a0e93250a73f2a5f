"""The probe set: evaluated aside, routed only to the metrics that need it, leaving training untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.functional import stratified_split
from sonde.metrics import CKA, SVCCA, ProbeF1, TestAccuracy
from sonde.probe.torch import TorchProbe

LAYERS = ["0", "1", "2", "3", "4"]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def run_training(metrics: list, probe_set: object = None, steps: int = 6) -> tuple[nn.Module, list[float], Collect,
                                                                                  list[dict[str, torch.Tensor]]]:
    """Train with a probe; return the model, its loss trajectory, the records and each step's starting weights."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    collect = Collect()
    losses: list[float] = []
    states: list[dict[str, torch.Tensor]] = []
    torch.manual_seed(123)  # dropout draws
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect], metrics=metrics, probe_set=probe_set) as p:
        for step in range(steps):
            x, y = data(32, 1000 + step)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss, labels=y, outputs=out)
            losses.append(loss.item())
    return model, losses, collect, states


def probe_activations(state: dict[str, torch.Tensor], x: torch.Tensor, batch: int) -> dict[str, list[np.ndarray]]:
    """Each layer's activations on ``x`` in eval mode, chunk by chunk, from a fresh copy of the weights."""
    model = make_model()
    model.load_state_dict(state)
    model.eval()
    acts: dict[str, list[np.ndarray]] = {name: [] for name in LAYERS}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, a, o, name=name: acts[name].append(o.detach().double().numpy().copy()))
    with torch.no_grad():
        for chunk in np.array_split(np.arange(len(x)), math.ceil(len(x) / batch)):
            model(x[torch.as_tensor(chunk)])
    return acts


def hsic1(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    return float((np.trace(kt @ lt) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * kt.sum(0) @ lt.sum(1))
                 / (n * (n - 3)))


def minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    grams = [(x.reshape(len(x), -1) @ x.reshape(len(x), -1).T, y.reshape(len(y), -1) @ y.reshape(len(y), -1).T)
             for x, y in zip(xs, ys)]
    xy = np.mean([hsic1(kx, ky) for kx, ky in grams])
    xx = np.mean([hsic1(kx, kx) for kx, _ in grams])
    yy = np.mean([hsic1(ky, ky) for _, ky in grams])
    return float(xy / np.sqrt(xx * yy))


def reference_svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """SVD-reduce each view to 99 % of its variance, then CCA through Σxx^-½ Σxy Σyy^-½."""

    def reduce(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=0)
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        k = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= keep - 1e-12)) + 1
        return a @ vt[:k].T

    xr, yr = reduce(x), reduce(y)
    inv_x = scipy.linalg.fractional_matrix_power(xr.T @ xr, -0.5).real
    inv_y = scipy.linalg.fractional_matrix_power(yr.T @ yr, -0.5).real
    rho = np.linalg.svd(inv_x @ (xr.T @ yr) @ inv_y, compute_uv=False)
    return float(np.mean(np.clip(rho[: min(xr.shape[1], yr.shape[1])], 0, 1)))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(TorchProbe, "probe_batch_size", 40)
    return 40


def test_probe_set_pass_leaves_training_bn_stats_and_modes_untouched(small_chunks: int) -> None:
    probe_x, probe_y = data(100, 7)
    test_loader = [data(30, 8), data(17, 9)]
    base_model, base_losses, base_records, _ = run_training(["mean"])
    model, losses, records, _ = run_training(
        ["mean", CKA(compute_every=1), SVCCA(compute_every=2), ProbeF1(compute_every=3),
         TestAccuracy(test_loader, every=2)],
        probe_set=(probe_x, probe_y),
    )
    assert losses == base_losses  # bit for bit: dropout draws, BN batch statistics, autograd unchanged
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(base_model[1], name))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base_model.parameters()))
    # the ordinary statistics never saw the probe set or the test loader
    assert [r[1:7] for r in records.find(metric="mean")] == [r[1:7] for r in base_records.find(metric="mean")]
    assert {r.metric for r in records.records} >= {"cka", "svcca", "probe_f1", "test_accuracy"}
    assert not records.find(phase="eval", metric="mean")


def test_modes_of_every_module_are_restored() -> None:
    model = make_model()
    model[3].eval()  # a deliberately mixed state: dropout off inside a training model
    with sonde.probe(model, store=None, metrics=[CKA(compute_every=1)], probe_set=data(20, 3)[0]):
        model(data(8, 4)[0])
        assert model.training and model[1].training and not model[3].training
        assert torch.is_grad_enabled()


def test_cka_records_match_an_independent_minibatch_cka(small_chunks: int) -> None:
    probe_x, _ = data(100, 7)
    _, _, records, states = run_training([CKA(compute_every=2), CKA(reference="previous", compute_every=2)],
                                         probe_set=probe_x)
    acts = {step: probe_activations(states[step], probe_x, small_chunks) for step in (0, 2, 4)}
    for layer in LAYERS:
        found = records.find(layer=layer, metric="cka")
        assert [r.step for r in found] == [0, 2, 4]
        assert all(r.phase == "train" and r.topic == "activations" for r in found)
        first = [r.value for r in found]
        previous = [r.value for r in records.find(layer=layer, metric="cka_previous")]
        assert first[0] == pytest.approx(1.0) and previous[0] == pytest.approx(1.0)
        assert first[1] == pytest.approx(minibatch_cka(acts[2][layer], acts[0][layer]), rel=1e-9)
        assert first[2] == pytest.approx(minibatch_cka(acts[4][layer], acts[0][layer]), rel=1e-9)
        assert previous[2] == pytest.approx(minibatch_cka(acts[4][layer], acts[2][layer]), rel=1e-9)
    assert records.value(layer="4", metric="cka", step=4) < 0.9999  # the model did move
    assert records.value(layer="4", metric="cka_previous", step=4) > records.value(layer="4", metric="cka", step=4)


def test_cka_matrix_rows_are_one_record_per_layer_pair(small_chunks: int) -> None:
    probe_x, _ = data(100, 7)
    _, _, records, states = run_training(["cka_matrix"], probe_set=probe_x, steps=2)
    acts = probe_activations(states[0], probe_x, small_chunks)
    rows = records.find(step=0)
    assert {r.metric for r in rows} == {f"cka_matrix:{b}" for b in LAYERS}
    assert len(rows) == len(LAYERS) ** 2
    for r in rows:
        other = r.metric.split(":", 1)[1]
        assert r.value == pytest.approx(minibatch_cka(acts[r.layer], acts[other]), rel=1e-9)
    assert records.value(layer="2", metric="cka_matrix:2") == pytest.approx(1.0)
    assert [r.layer for r in rows][:: len(LAYERS)] == LAYERS  # forward order


def test_svcca_metric_pools_conv_maps_per_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh())
    probe_x = torch.randn(120, 2, 5, 5)
    collect = Collect()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect], metrics=[SVCCA(compute_every=1)],
                     probe_set=probe_x):
        states = []
        for _ in range(2):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            model(torch.randn(8, 2, 5, 5)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    got = collect.value(layer="1", metric="svcca", step=1)

    def pooled(state: dict[str, torch.Tensor]) -> np.ndarray:
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh())
        m.load_state_dict(state)
        with torch.no_grad():
            return m(probe_x).mean(dim=(2, 3)).double().numpy()

    assert got == pytest.approx(reference_svcca(pooled(states[1]), pooled(states[0])), rel=1e-6)


def test_probe_f1_on_per_token_labels_of_a_sequence_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    n, t = 120, 6
    g = torch.Generator().manual_seed(1)
    probe_x = torch.randn(n, t, 5, generator=g)
    labels = (probe_x[..., 0] > 0).long()
    labels[:, -2:] = -100  # padding
    collect = Collect()
    with sonde.probe(model, store=None, sinks=[collect], metrics=[ProbeF1(compute_every=1)],
                     probe_set=(probe_x, labels)):
        model(torch.randn(4, t, 5))
    with torch.no_grad():
        acts = model[0](probe_x).reshape(n * t, 8).double().numpy()
    flat = labels.reshape(-1).numpy()
    keep = flat >= 0
    x, y = acts[keep], flat[keep]
    train, test = stratified_split(y, 0.25, seed=0)
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(tol=1e-10, max_iter=10000).fit(scaler.transform(x[train]), y[train])
    expected = f1_score(y[test], clf.predict(scaler.transform(x[test])), average="macro")
    assert collect.value(layer="0", metric="probe_f1") == pytest.approx(expected, abs=1e-12)


def test_training_batch_labels_feed_a_reservoir_per_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 3))
    seen: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    collect = Collect()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ys = []
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect],
                     metrics=[ProbeF1(compute_every=3, samples=5000)]) as p:
        for step in range(6):
            x, y = data(40, 50 + step)
            out = model(x)  # ReLU(inplace=True) overwrites layer 0's output: the metric must have copied it
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
            opt.zero_grad()
            p.log(labels=y)
            ys.append(y)
    # compute_every=3 computes at steps 0 and 3, and the probe's close computes what is left (step 5);
    # reset="compute": each value covers exactly the batches since the previous value
    for step, batches in ((0, range(0, 1)), (3, range(1, 4)), (5, range(4, 6))):
        x = torch.cat([seen[i] for i in batches]).double().numpy()
        y = torch.cat([ys[i] for i in batches]).numpy()
        assert (x < 0).any()  # the pre-ReLU values, not what the in-place ReLU left
        train, test = stratified_split(y, 0.25, seed=0)
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(tol=1e-10, max_iter=10000).fit(scaler.transform(x[train]), y[train])
        expected = f1_score(y[test], clf.predict(scaler.transform(x[test])), average="macro")
        assert collect.value(layer="0", metric="probe_f1", step=step) == pytest.approx(expected, abs=1e-12)
    assert [r.step for r in collect.find(layer="2", metric="probe_f1")] == [0, 3, 5]


def test_reservoir_keeps_at_most_samples_rows() -> None:
    from sonde.metrics.tasks import Reservoir

    r = Reservoir(50)
    rng = np.random.default_rng(0)
    counts = np.zeros(1000)
    for _ in range(200):
        r = Reservoir(50)
        for start in range(0, 1000, 100):
            rows = np.arange(start, start + 100, dtype=float)[:, None]
            r.offer(rows, np.zeros(100, dtype=int), rng)
        assert r.rows is not None and r.rows.shape == (50, 1) and r.seen == 1000
        counts[r.rows[:, 0].astype(int)] += 1
    # uniform: every row has probability 50/1000 of being kept; early and late rows alike
    assert counts[:500].sum() == pytest.approx(counts[500:].sum(), rel=0.1)


def test_bad_probe_set_configurations_fail_at_construction() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="probe_set"):
        sonde.probe(model, store=None, metrics=["cka"])
    with pytest.raises(ConfigError, match="needs labels"):
        sonde.probe(model, store=None, metrics=["probe_f1"], probe_set=torch.randn(20, 6))
    with pytest.raises(ConfigError, match="one entry"):
        sonde.probe(model, store=None, metrics=["cka"], probe_set=(torch.randn(20, 6), torch.zeros(19).long()))
    with pytest.raises(ConfigError, match="at least 8"):
        sonde.probe(model, store=None, metrics=["cka"], probe_set=torch.randn(3, 6))
    assert getattr(model, "_sonde_probe", None) is None


def test_task_metric_without_labels_says_how_to_give_them(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    collect = Collect()
    with sonde.probe(model, store=None, sinks=[collect], metrics=[ProbeF1(compute_every=1)]):
        for _ in range(3):
            model(data(16, 5)[0]).sum().backward()
    assert not collect.find(metric="probe_f1")
    assert caplog.text.count("p.log(labels=...)") == len(LAYERS)  # once per layer, not once per step


def test_a_probe_set_pass_that_fails_is_reported_once_and_switched_off(
    caplog: pytest.LogCaptureFixture, small_chunks: int
) -> None:
    class Fragile(nn.Module):
        fail_on: set[int] = {2}  # noqa: RUF012

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                self.calls += 1
                if self.calls in self.fail_on:  # the second chunk of the first pass
                    raise RuntimeError("probe input rejected")
            return self.fc(x)

    model = Fragile()
    collect = Collect()
    probe_x = data(100, 7)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect], metrics=[CKA(compute_every=1)],
                     probe_set=probe_x):
        for step in range(3):
            model(data(8, step)[0]).sum().backward()
            opt.step()
            opt.zero_grad()
    assert caplog.text.count("probe-set pass failed") == 1
    assert model.calls == 2  # the failed pass broke off at its second chunk; no pass ran after it
    assert model.training  # the pass put every module's mode back
    assert not collect.find(layer="fc", metric="cka")
    assert [r.step for r in collect.find(metric="alert")] == []
