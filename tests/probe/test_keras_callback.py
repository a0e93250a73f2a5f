"""``sonde.keras.SondeCallback`` on Keras 3 (TensorFlow backend) ``model.fit``: every topic at every
step, checked against the same training replayed by hand with ``tf.GradientTape`` (weights,
gradients, updates, activations, inputs, output gradients, loss, accuracy); the training itself is
unchanged by the probe; ``every=N`` runs Keras's own function at the other steps; validation is its
own phase; a nested model's layers get dotted names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collect import Collect
from sonde.errors import ConfigError, LayerFilterError, ProbeError
from sonde.store import open_store

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - KERAS_BACKEND set to another backend
    pytest.skip("sonde.keras records the TensorFlow backend; unset KERAS_BACKEND", allow_module_level=True)

from keras_mlp import BATCH, LR, data, fit, mlp  # noqa: E402

from sonde.keras import SondeCallback  # noqa: E402


def _replay(epochs: int) -> list[dict[tuple[str, str], np.ndarray]]:
    """The same training by hand: per step, every topic's tensor."""
    model = mlp()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fc1, fc2 = model.get_layer("fc1"), model.get_layer("fc2")
    x, y = data()
    steps = []
    for _epoch in range(epochs):
        for first in range(0, len(x), BATCH):
            xb, yb = tf.constant(x[first:first + BATCH]), y[first:first + BATCH]
            with tf.GradientTape() as tape:
                h = fc1(xb)
                out = fc2(h)
                loss = loss_fn(yb, out)
            variables = [fc1.kernel, fc1.bias, fc2.kernel, fc2.bias]
            grads = tape.gradient(loss, [*variables, h, out])
            seen = {("fc1", "inputs"): xb.numpy(), ("fc1", "activations"): h.numpy(),
                    ("fc2", "inputs"): h.numpy(), ("fc2", "activations"): out.numpy(),
                    ("fc1", "output_grads"): grads[4].numpy(), ("fc2", "output_grads"): grads[5].numpy(),
                    ("", "loss"): np.array(float(loss)),
                    ("", "accuracy"): np.array(float((out.numpy().argmax(1) == yb).mean()))}
            for layer, variable, grad in zip(("fc1", "fc1", "fc2", "fc2"), variables, grads[:4], strict=True):
                kind = "bias" if variable.name == "bias" else "weight"
                seen[(layer, "biases" if kind == "bias" else "weights")] = variable.numpy().copy()
                seen[(layer, f"{kind}_grads")] = grad.numpy()
                seen[(layer, f"{kind}_updates")] = -LR * grad.numpy()
                variable.assign(variable - LR * grad)
            steps.append(seen)
    return steps


def test_every_topic_at_every_step_matches_the_training_replayed_by_hand(collect: Collect) -> None:
    callback = SondeCallback(store=None, sinks=[collect], metrics=["mean", "norm", "loss", "train_accuracy"], every=1)
    model = mlp()
    fit(model, callback, epochs=2)
    assert callback.probe is None
    expected = _replay(2)
    assert sorted({r.step for r in collect.records if r.phase == "train"}) == list(range(8))
    for k, seen in enumerate(expected):
        for (layer, topic), value in seen.items():
            if layer == "":
                metric = "train_accuracy" if topic == "accuracy" else "loss"
                got = collect.value(step=k, phase="train", metric=metric)
                assert got == pytest.approx(float(value), rel=1e-5, abs=1e-7), (k, metric)
                continue
            for metric, reference in (("mean", float(value.mean())), ("norm", float(np.linalg.norm(value)))):
                got = collect.value(step=k, phase="train", layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(reference, rel=1e-4, abs=1e-6), (k, layer, topic, metric)


def test_the_probe_leaves_training_unchanged_and_every_n_runs_keras_own_step(collect: Collect) -> None:
    plain, probed = mlp(), mlp()
    fit(plain, epochs=2)
    callback = SondeCallback(store=None, sinks=[collect], metrics=["norm"], every=3)
    fit(probed, callback, epochs=2)
    for a, b in zip(plain.get_weights(), probed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted({r.step for r in collect.records if r.phase == "train"}) == [0, 3, 6]
    # after fit the model is Keras's own again: its functions, its layers' calls
    assert "call" not in probed.get_layer("fc1").__dict__
    assert not hasattr(probed, "_sonde_probe")
    probed.fit(*data(), verbose=0)  # and trains without the probe


def test_validation_is_its_own_phase_at_the_step_whose_weights_it_used(collect: Collect) -> None:
    callback = SondeCallback(store=None, sinks=[collect], metrics=["loss", "mean"])
    model = mlp()
    x, y = data()
    fit(model, callback, epochs=2, validation_data=(x[:32], y[:32]))
    evals = sorted({r.step for r in collect.records if r.phase == "eval"})
    assert evals == [4, 8]  # after each epoch's 4 steps
    # the eval loss at step 8 is the loss of the final weights on the validation data, in two batches
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    batches = [float(loss_fn(y[i:i + 16], model(x[i:i + 16]))) for i in (0, 16)]
    assert collect.value(step=8, phase="eval", metric="loss") == pytest.approx(np.mean(batches), rel=1e-5)
    assert {r.topic for r in collect.records if r.phase == "eval"} >= {"activations", "inputs", "loss"}
    assert not any(r.topic.endswith("grads") for r in collect.records if r.phase == "eval")


def test_nested_models_one_hot_labels_and_layer_selection(collect: Collect) -> None:
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, activation="relu", name="dense")],
                               name="encoder")
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(encoder(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    callback = SondeCallback(store=None, sinks=[collect], metrics=["mean", "train_accuracy"])
    x, y = data()
    one_hot = np.eye(3, dtype="float32")[y]
    model.fit(x, one_hot, batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    assert {r.layer for r in collect.records} == {"", "encoder.dense", "head"}
    probabilities = model.predict(x, verbose=0)  # after the step; accuracy was recorded before it
    assert 0.0 <= collect.value(step=0, metric="train_accuracy") <= 1.0
    assert probabilities.shape == (64, 3)
    only = Collect()
    model.fit(x, one_hot, batch_size=64, epochs=1, verbose=0,
              callbacks=[SondeCallback(store=None, sinks=[only], metrics=["mean"], layers=["encoder.*"])])
    assert {r.layer for r in only.records} - {""} == {"encoder.dense"}
    with pytest.raises(LayerFilterError, match="names look like 'encoder'"):
        model.fit(x, one_hot, verbose=0, callbacks=[SondeCallback(store=None, layers=["decoder*"])])


def test_bad_keywords_fail_when_the_callback_is_made() -> None:
    with pytest.raises(ConfigError, match="unexpected keyword.*optimizer.*the optimizer is the model's"):
        SondeCallback(optimizer="sgd")


def test_a_fit_that_raises_keeps_what_it_recorded(tmp_path: Path) -> None:
    class Stop(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 2:
                raise RuntimeError("out of memory")

    callback = SondeCallback(run="oom", store=tmp_path / "s.db", metrics=["loss"])
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(mlp(), [callback, Stop()], epochs=1)
    callback.close()
    with open_store(tmp_path / "s.db") as store:
        assert store.runs().set_index("name").loc["oom", "status"] == "failed"
        assert sorted(store.load("oom")["step"].unique()) == [0, 1, 2]


def test_sonde_probe_points_a_keras_model_to_its_callback() -> None:
    import sonde

    with pytest.raises(ProbeError, match=r"got keras.*callbacks=\[sonde.keras.SondeCallback\(\)\]"):
        sonde.probe(mlp(), store=None)


def test_a_layer_with_several_weights_merges_them_into_one_statistic(collect: Collect) -> None:
    """A SimpleRNN holds kernel and recurrent_kernel (weights) and bias: as for PyTorch, a layer's
    weights are one set of values, so its norm is that of all its weights together."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5, 4)), keras.layers.SimpleRNN(6, name="rnn"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    rnn = model.get_layer("rnn")
    before = {v.name: v.numpy().copy() for v in rnn.trainable_variables}
    assert set(before) == {"kernel", "recurrent_kernel", "bias"}
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5, 4)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[SondeCallback(store=None, sinks=[collect], metrics=["norm"])])
    after = {v.name: v.numpy() for v in rnn.trainable_variables}

    def norm(arrays: list[np.ndarray]) -> float:
        return float(np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays)))

    weights = ["kernel", "recurrent_kernel"]
    assert collect.value(layer="rnn", topic="weights", metric="norm") == pytest.approx(
        norm([before[w] for w in weights]), rel=1e-5)
    assert collect.value(layer="rnn", topic="weight_updates", metric="norm") == pytest.approx(
        norm([after[w] - before[w] for w in weights]), rel=1e-4)
    assert collect.value(layer="rnn", topic="biases", metric="norm") == pytest.approx(norm([before["bias"]]), rel=1e-5)
    assert not any(r.metric == "train_accuracy" for r in collect.records)  # regression: no accuracy


def test_a_recording_step_that_cannot_be_built_leaves_training_as_it_was(
        collect: Collect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sys

    def broken(self: Any, name: str, args: Any, output: Any) -> Any:
        raise RuntimeError("cannot record here")

    monkeypatch.setattr(sys.modules["sonde.probe.keras"]._Recorder, "layer_call", broken)
    plain, probed = mlp(), mlp()
    fit(plain, epochs=1)
    with caplog.at_level("ERROR", logger="sonde"):
        fit(probed, SondeCallback(store=None, sinks=[collect], metrics=["norm"]), epochs=1)
    for a, b in zip(plain.get_weights(), probed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "could not build the recording train step; training goes on unrecorded" in caplog.text
    assert "cannot record here" in caplog.text


def test_a_probe_that_cannot_attach_leaves_fit_training(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sys

    def incompatible(self: Any) -> None:  # as if a Keras release renamed what sonde hooks
        raise AttributeError("'Sequential' object has no attribute '_make_function'")

    monkeypatch.setattr(sys.modules["sonde.probe.keras"].KerasProbe, "attach", incompatible)
    plain, probed = mlp(), mlp()
    fit(plain, epochs=1)
    callback = SondeCallback(store=None, metrics=["norm"])
    with caplog.at_level("ERROR", logger="sonde"):
        fit(probed, callback, epochs=1)
    assert "could not attach to" in caplog.text and "training goes on unrecorded" in caplog.text
    assert callback.probe is None
    for a, b in zip(plain.get_weights(), probed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
