"""``sonde.jax.probe`` on Flax NNX models under ``nnx.jit``: every topic at every step, checked
against the same training replayed by hand with ``jax.grad`` on plain arrays; evaluation passes
as their own phase; a module called twice as two layers; the model's own classes back after close;
clear errors for what it cannot probe."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from collect import Collect
from sonde.errors import ConfigError, LayerFilterError, ProbeError
from sonde.metrics import Metric

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import sonde.jax  # noqa: E402
from sonde.probe.jax import select_layers  # noqa: E402

LR = 0.1


class MLP(nnx.Module):  # type: ignore[misc]
    def __init__(self, rngs: Any) -> None:
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.fc2(nnx.tanh(self.fc1(x)))


def _data(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16)) for _ in range(steps)]


@nnx.jit  # type: ignore[misc]
def _train_step(model: Any, optimizer: Any, x: Any, y: Any) -> tuple[Any, Any]:
    def loss_fn(m: Any) -> Any:
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, logits


@nnx.jit  # type: ignore[misc]
def _eval_step(model: Any, x: Any) -> Any:
    return model(x)


def _replay(params: dict[str, np.ndarray], data: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[Any, Any]]:
    """Plain arrays and jax.grad: each step's tensors of every topic."""
    jnp = jax.numpy

    def loss(p: dict[str, Any], x: Any, y: Any, dh: Any, do: Any) -> Any:
        h = x @ p["w1"] + p["b1"] + dh  # fc1's output (dh, do: zero offsets whose gradients are output_grads)
        out = jnp.tanh(h) @ p["w2"] + p["b2"] + do
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    grad = jax.grad(loss, argnums=(0, 3, 4))
    steps = []
    p = {k: jnp.asarray(v) for k, v in params.items()}
    for x, y in data:
        h = x @ p["w1"] + p["b1"]
        out = jnp.tanh(h) @ p["w2"] + p["b2"]
        g, dh, do = grad(p, x, y, jnp.zeros_like(h), jnp.zeros_like(out))
        seen = {("fc1", "inputs"): x, ("fc1", "activations"): h, ("fc2", "inputs"): jnp.tanh(h),
                ("fc2", "activations"): out, ("fc1", "output_grads"): dh, ("fc2", "output_grads"): do,
                ("", "loss"): loss(p, x, y, 0.0, 0.0), ("", "train_accuracy"): (np.asarray(out).argmax(1) == y).mean()}
        for layer, w, b in (("fc1", "w1", "b1"), ("fc2", "w2", "b2")):
            seen[(layer, "weights")], seen[(layer, "biases")] = p[w], p[b]
            seen[(layer, "weight_grads")], seen[(layer, "bias_grads")] = g[w], g[b]
            seen[(layer, "weight_updates")], seen[(layer, "bias_updates")] = -LR * g[w], -LR * g[b]
        steps.append({k: np.asarray(v, dtype=np.float64) for k, v in seen.items()})
        p = {k: p[k] - LR * g[k] for k in p}
    return steps


# where the statistics are taken: (JaxProbe.device_statistics, JaxProbe.statistics_kernel); on the CPU
# the default is in the step by sonde's kernel, "host" sends the arrays, "jnp" reduces with XLA's ops
PATHS = {"kernel": (None, True), "host": (False, True), "jnp": (True, False)}


def _use(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    import sys

    probe_class = sys.modules["sonde.probe.jax"].JaxProbe
    on_device, kernel = PATHS[path]
    monkeypatch.setattr(probe_class, "device_statistics", on_device)
    monkeypatch.setattr(probe_class, "statistics_kernel", kernel)


@pytest.mark.parametrize("path", list(PATHS))
def test_every_topic_at_every_jitted_step_matches_a_hand_replay(
        collect: Collect, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    _use(monkeypatch, path)
    model = MLP(nnx.Rngs(0))
    params = {"w1": np.asarray(model.fc1.kernel.get_value()), "b1": np.asarray(model.fc1.bias.get_value()),
              "w2": np.asarray(model.fc2.kernel.get_value()), "b2": np.asarray(model.fc2.bias.get_value())}
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    data = _data(3)
    with sonde.jax.probe(model, optimizer=optimizer, store=None, sinks=[collect],
                         metrics=["mean", "norm", "loss", "train_accuracy"]) as p:
        for x, y in data:
            loss, logits = _train_step(model, optimizer, x, y)
            p.log(loss=loss, labels=y, outputs=logits)
    assert sorted({r.step for r in collect.records}) == [0, 1, 2]
    for k, seen in enumerate(_replay(params, data)):
        for (layer, topic), value in seen.items():
            if layer == "":
                got = collect.value(step=k, metric=topic)
                assert got == pytest.approx(float(value), rel=1e-5), (k, topic)
                continue
            for metric, reference in (("mean", value.mean()), ("norm", np.linalg.norm(value))):
                got = collect.value(step=k, layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(float(reference), rel=1e-4, abs=1e-6), (k, layer, topic, metric)


def test_evaluation_passes_are_their_own_phase_and_classes_come_back(collect: Collect) -> None:
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    data = _data(3)
    classes = (type(model), type(model.fc1), type(optimizer))
    with sonde.jax.probe(model, optimizer=optimizer, store=None, sinks=[collect], metrics=["mean"]):
        _train_step(model, optimizer, *data[0])
        outputs = [np.asarray(_eval_step(model, x)) for x, _ in data]  # three batches, one eval value
        _train_step(model, optimizer, *data[1])
        _eval_step(model, data[2][0])  # the last pass: eval at the step after the last update
    assert sorted({(r.phase, r.step) for r in collect.records}) == [("eval", 1), ("eval", 2), ("train", 0),
                                                                   ("train", 1)]
    merged = np.concatenate(outputs)
    assert collect.value(phase="eval", step=1, layer="fc2", topic="activations", metric="mean") == pytest.approx(
        float(merged.mean()), rel=1e-5)
    assert (type(model), type(model.fc1), type(optimizer)) == classes
    before = len(collect.records)
    _train_step(model, optimizer, *data[2])  # retraced as the model's own: nothing reaches the probe
    assert len(collect.records) == before


def test_a_module_called_twice_is_two_layers_and_eager_code_works(collect: Collect) -> None:
    class Twice(nnx.Module):  # type: ignore[misc]
        def __init__(self, rngs: Any) -> None:
            self.fc = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.fc(nnx.relu(self.fc(x)))

    model = Twice(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    x = np.linspace(-1, 1, 8, dtype="float32").reshape(2, 4)
    w, b = np.asarray(model.fc.kernel.get_value()), np.asarray(model.fc.bias.get_value())
    with sonde.jax.probe(model, optimizer=optimizer, store=None, sinks=[collect], metrics=["mean"]):
        for _ in range(2):  # no jit: eager NNX
            grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)
            optimizer.update(model, grads)
    layers = {(r.layer, r.topic) for r in collect.records if r.step == 1}
    assert {("fc", "activations"), ("fc:2", "activations"), ("fc", "weights")} <= layers
    # the second call's input is relu of the first call's output, with the weights before step 0
    assert collect.value(step=0, layer="fc:2", topic="inputs", metric="mean") == pytest.approx(
        float(np.maximum(x @ w + b, 0).mean()), rel=1e-5)


def test_without_an_optimizer_each_forward_pass_is_a_step(collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    model = MLP(nnx.Rngs(0))
    with caplog.at_level(logging.WARNING, logger="sonde"):
        with sonde.jax.probe(model, store=None, sinks=[collect], metrics=["mean"]):
            for x, _ in _data(3):
                _eval_step(model, x)
    assert "no optimizer= given" in caplog.text
    assert sorted({(r.phase, r.step) for r in collect.records}) == [("train", 0), ("train", 1), ("train", 2)]


def test_what_it_cannot_probe_is_a_clear_error() -> None:
    with pytest.raises(ProbeError, match="expects a flax.nnx.Module, got builtins.dict"):
        sonde.jax.probe({"w": 1}, store=None)
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ConfigError, match="optimizer= expects a flax.nnx.Optimizer"):
        sonde.jax.probe(model, optimizer=optax.sgd(0.1), store=None)
    with pytest.raises(LayerFilterError, match="names look like 'fc1', 'fc2'"):
        sonde.jax.probe(model, layers=["conv*"], store=None)
    with sonde.jax.probe(model, store=None, metrics=["mean"]):
        with pytest.raises(ProbeError, match="already probed"):
            sonde.jax.probe(model, store=None)


def test_layer_names_are_attribute_paths_and_depth_merges_a_blocks_weights(collect: Collect) -> None:
    class Block(nnx.Module):  # type: ignore[misc]
        def __init__(self, rngs: Any) -> None:
            self.lin = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return nnx.relu(self.lin(x))

    class Deep(nnx.Module):  # type: ignore[misc]
        def __init__(self, rngs: Any) -> None:
            self.blocks = nnx.List([Block(rngs), Block(rngs)])
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    model = Deep(nnx.Rngs(0))
    assert list(select_layers(model)) == ["blocks.0.lin", "blocks.1.lin", "head"]
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    x = np.ones((2, 4), dtype="float32")
    weights = np.concatenate([np.asarray(b.lin.kernel.get_value()).ravel() for b in model.blocks])
    with sonde.jax.probe(model, optimizer=optimizer, depth=1, store=None, sinks=[collect], metrics=["norm"]):
        optimizer.update(model, nnx.grad(lambda m: (m(x) ** 2).mean())(model))
    assert {r.layer for r in collect.records} == {"blocks", "head"}
    assert collect.value(layer="blocks", topic="weights", metric="norm") == pytest.approx(
        float(np.linalg.norm(weights)), rel=1e-5)
    assert not collect.find(layer="blocks", topic="activations")  # a list is never called


def test_steps_the_schedule_skips_send_nothing_to_the_host(collect: Collect, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    probe_module = sys.modules["sonde.probe.jax"]
    sent: list[str] = []
    on_arrays = probe_module.JaxProbe._on_arrays

    def counted(self: Any, layer: str, topics: tuple[str, ...], *arrays: Any) -> None:
        sent.extend(f"{layer}/{t}" for t in topics)
        on_arrays(self, layer, topics, *arrays)

    monkeypatch.setattr(probe_module.JaxProbe, "_on_arrays", counted)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    with sonde.jax.probe(model, optimizer=optimizer, every=3, store=None, sinks=[collect], metrics=["mean"]) as p:
        for x, y in _data(7):
            loss, _ = _train_step(model, optimizer, x, y)
            p.log(loss=loss)
    assert sorted({r.step for r in collect.records}) == [0, 3, 6]
    # two layers x (inputs, activations, output_grads) at each of the 3 recorded steps, nothing else
    assert len(sent) == 3 * 2 * 3


def _spy_payloads(monkeypatch: pytest.MonkeyPatch, path: str) -> list[tuple[str, Any]]:
    """Statistics taken in the step (``path``: by sonde's kernel, the CPU default, or by ``jnp``
    reductions, as on accelerators), and every (topic, leaf) that reaches the host through the
    probe's tensor callbacks."""
    import sys

    probe_module = sys.modules["sonde.probe.jax"]
    _use(monkeypatch, path)
    if path == "kernel":
        assert probe_module.jax_kernel.available()  # the test machine has a C compiler
    seen: list[tuple[str, Any]] = []
    on_arrays, on_update = probe_module.JaxProbe._on_arrays, probe_module.JaxProbe._on_update

    def arrays(self: Any, layer: str, topics: tuple[str, ...], *payloads: Any) -> None:
        seen.extend((t, leaf) for t, p in zip(topics, payloads, strict=True) for leaf in jax.tree.leaves(p))
        on_arrays(self, layer, topics, *payloads)

    def update(self: Any, topics: tuple[Any, ...], payloads: list[Any]) -> None:
        seen.extend((t, leaf) for (_, t), p in zip(topics, payloads, strict=True) for leaf in jax.tree.leaves(p))
        on_update(self, topics, payloads)

    monkeypatch.setattr(probe_module.JaxProbe, "_on_arrays", arrays)
    monkeypatch.setattr(probe_module.JaxProbe, "_on_update", update)
    return seen


def _bin(value: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of ``value`` over ``bins`` equal bins of [lo, hi], outside values in the end bins."""
    index = np.clip(np.floor((value.ravel() - lo) * (bins / (hi - lo))), 0, bins - 1).astype(int)
    return np.bincount(index, minlength=bins)


@pytest.mark.parametrize("path", ["kernel", "jnp"])
def test_default_statistics_are_taken_in_the_step_and_only_they_cross(
        collect: Collect, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    seen = _spy_payloads(monkeypatch, path)
    model = MLP(nnx.Rngs(0))
    params = {"w1": np.asarray(model.fc1.kernel.get_value()), "b1": np.asarray(model.fc1.bias.get_value()),
              "w2": np.asarray(model.fc2.kernel.get_value()), "b2": np.asarray(model.fc2.bias.get_value())}
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    data = _data(3)
    with sonde.jax.probe(model, optimizer=optimizer, store=None, sinks=[collect]) as p:  # the default metrics
        for x, y in data:
            loss, logits = _train_step(model, optimizer, x, y)
            p.log(loss=loss, labels=y, outputs=logits)
    # per tensor, no array: by jnp, 6 float partials, 4 counts (size, non-zero, NaN, Inf) and 64 histogram
    # counts; by the kernel, one vector of 32-bit words: 10 float64 partials, 64 int64 counts, 2 float32
    expected = {(1, 150)} if path == "kernel" else {(1, 6), (1, 4), (1, 64)}
    assert seen and {(np.ndim(leaf), np.size(leaf)) for _, leaf in seen} == expected
    edges: dict[tuple[str, str], tuple[float, float]] = {}
    for k, step in enumerate(_replay(params, data)):
        for (layer, topic), value in step.items():
            if layer == "":
                continue
            got = {r.metric: r.value for r in collect.find(step=k, layer=layer, topic=topic)}
            reference = {"mean": value.mean(), "std": value.std(), "var": value.var(), "min": value.min(),
                         "max": value.max(), "abs_mean": np.abs(value).mean(), "norm": np.linalg.norm(value),
                         "zero_frac": (value == 0).mean(), "nonfinite_frac": 0.0}
            for metric, ref in reference.items():
                assert got[metric] == pytest.approx(float(ref), rel=1e-4, abs=1e-6), (k, layer, topic, metric)
            if (layer, topic) not in edges and value.max() > value.min():  # the first range edges can span
                edges[(layer, topic)] = (float(value.min()), float(value.max()))
                lo, hi = edges[(layer, topic)]
                np.testing.assert_allclose(got["histogram_edges"], np.linspace(lo, hi, 65), rtol=1e-6,
                                           atol=1e-6 * (hi - lo))
            if (layer, topic) in edges:
                counts = _bin(value, *edges[(layer, topic)], 64)
                # float32 on the device against float64 here: an element on a bin edge may fall either side
                assert np.abs(got["histogram"] - counts).sum() <= 2, (k, layer, topic)
                assert got["histogram"].sum() == value.size
            else:
                assert "histogram" not in got  # a constant tensor (a zero bias at step 0) fixes no edges
    assert {t for t, _ in seen} >= {"inputs", "activations", "output_grads", "weights", "bias_updates"}


class _Peak(Metric):
    """Largest absolute value, read from the tensor itself (a metric that needs the samples)."""

    name = "peak"
    topics = ("activations", "weight_grads")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("peak", default=-np.inf, reduce="max")

    def update(self, capture: Any) -> None:
        self.stage("peak", capture.tensor.detach().abs().max().double())

    def compute(self) -> dict[str, Any]:
        return {"peak": float(self.state["peak"])}


@pytest.mark.parametrize("path", ["kernel", "jnp"])
def test_a_metric_that_reads_samples_gets_the_whole_array(
        collect: Collect, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    seen = _spy_payloads(monkeypatch, path)
    model = MLP(nnx.Rngs(0))
    params = {"w1": np.asarray(model.fc1.kernel.get_value()), "b1": np.asarray(model.fc1.bias.get_value()),
              "w2": np.asarray(model.fc2.kernel.get_value()), "b2": np.asarray(model.fc2.bias.get_value())}
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    data = _data(2)
    with sonde.jax.probe(model, optimizer=optimizer, store=None, sinks=[collect], metrics=["mean", _Peak()]):
        for x, y in data:
            _train_step(model, optimizer, x, y)
    shapes = {(t, np.shape(leaf)) for t, leaf in seen}
    assert {("activations", (16, 8)), ("activations", (16, 3)), ("weight_grads", (4, 8))} <= shapes
    assert {np.ndim(leaf) for t, leaf in seen if t in ("inputs", "output_grads", "weights")} == {1}
    for k, step in enumerate(_replay(params, data)):
        for layer in ("fc1", "fc2"):
            for topic in ("activations", "weight_grads"):
                value = step[(layer, topic)]
                assert collect.value(step=k, layer=layer, topic=topic, metric="peak") == pytest.approx(
                    float(np.abs(value).max()), rel=1e-5)
                assert collect.value(step=k, layer=layer, topic=topic, metric="mean") == pytest.approx(
                    float(value.mean()), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("path", ["kernel", "jnp"])
def test_evaluation_passes_merge_their_device_statistics(
        collect: Collect, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    seen = _spy_payloads(monkeypatch, path)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    data = _data(3)
    with sonde.jax.probe(model, optimizer=optimizer, store=None, sinks=[collect], metrics=["mean", "max", "histogram"]):
        _train_step(model, optimizer, *data[0])
        outputs = np.concatenate([np.asarray(_eval_step(model, x)) for x, _ in data])  # three batches, one value
        _train_step(model, optimizer, *data[1])
    assert {np.ndim(leaf) for _, leaf in seen} == {1}
    find = {"phase": "eval", "step": 1, "layer": "fc2", "topic": "activations"}
    assert collect.value(**find, metric="mean") == pytest.approx(float(outputs.mean()), rel=1e-5)
    assert collect.value(**find, metric="max") == pytest.approx(float(outputs.max()), rel=1e-6)
    # the first batch fixes the range; the later ones count over it (outside values in the end bins)
    first = outputs[:16]
    counts = _bin(outputs, float(first.min()), float(first.max()), 64)
    assert np.abs(collect.value(**find, metric="histogram") - counts).sum() <= 2
