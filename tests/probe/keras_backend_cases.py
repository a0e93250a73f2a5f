"""``sonde.keras.SondeCallback`` on Keras 3's torch and jax backends, run by
``test_keras_backends.py`` in a child process per backend (Keras picks its backend when it is
imported: ``KERAS_BACKEND=torch`` or ``jax``). Every topic at every step is checked against the
same training replayed by hand with that backend's own gradient function (``torch.autograd`` on
torch, ``jax.grad`` on jax); the training is unchanged by the probe; ``every=2`` records the even
steps; validation is its own phase; a convolution's output gradients match."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from collect import Collect

keras = pytest.importorskip("keras")
BACKEND = keras.backend.backend()
if BACKEND not in ("torch", "jax"):  # pragma: no cover - run without KERAS_BACKEND by mistake
    pytest.skip("run with KERAS_BACKEND=torch or jax (test_keras_backends.py does)", allow_module_level=True)

from keras_mlp import BATCH, LR, data, fit, mlp  # noqa: E402

from sonde.keras import SondeCallback  # noqa: E402


def _mlp_gradients(params: list[np.ndarray], xb: np.ndarray, yb: np.ndarray) -> dict[str, Any]:
    """The MLP's loss, hidden output, logits, and the loss's gradients with respect to the four
    parameters and the two layer outputs, by the backend's own gradient function."""
    if BACKEND == "torch":
        import torch

        w1, b1, w2, b2 = (torch.tensor(p, requires_grad=True) for p in params)
        h = torch.tanh(torch.from_numpy(xb) @ w1 + b1)
        out = h @ w2 + b2
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(yb))
        grads = torch.autograd.grad(loss, [w1, b1, w2, b2, h, out])
        g = [t.numpy() for t in grads]
        return {"loss": float(loss.detach()), "h": h.detach().numpy(), "out": out.detach().numpy(),
                "params": g[:4], "h_grad": g[4], "out_grad": g[5]}
    import jax
    import jax.numpy as jnp

    def cross_entropy(logits: Any) -> Any:
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(yb)), yb])

    def head(h: Any, w2: Any, b2: Any) -> Any:
        return cross_entropy(h @ w2 + b2)

    def loss_of(p: list[Any]) -> Any:
        return head(jnp.tanh(xb @ p[0] + p[1]), p[2], p[3])

    p = [jnp.asarray(a) for a in params]
    h = jnp.tanh(xb @ p[0] + p[1])
    out = h @ p[2] + p[3]
    return {"loss": float(loss_of(p)), "h": np.asarray(h), "out": np.asarray(out),
            "params": [np.asarray(t) for t in jax.grad(loss_of)(p)],
            "h_grad": np.asarray(jax.grad(head)(h, p[2], p[3])), "out_grad": np.asarray(jax.grad(cross_entropy)(out))}


def _replay(epochs: int) -> list[dict[tuple[str, str], np.ndarray]]:
    """The same training by hand: per step, every topic's tensor."""
    params = [w.copy() for w in mlp().get_weights()]  # fc1 kernel, bias, fc2 kernel, bias
    x, y = data()
    steps = []
    for _epoch in range(epochs):
        for first in range(0, len(x), BATCH):
            xb, yb = x[first:first + BATCH], y[first:first + BATCH]
            g = _mlp_gradients(params, xb, yb)
            seen = {("fc1", "inputs"): xb, ("fc1", "activations"): g["h"], ("fc2", "inputs"): g["h"],
                    ("fc2", "activations"): g["out"], ("fc1", "output_grads"): g["h_grad"],
                    ("fc2", "output_grads"): g["out_grad"], ("", "loss"): np.array(g["loss"]),
                    ("", "accuracy"): np.array(float((g["out"].argmax(1) == yb).mean()))}
            for i, (layer, kind) in enumerate((("fc1", "weight"), ("fc1", "bias"), ("fc2", "weight"), ("fc2", "bias"))):
                seen[(layer, "biases" if kind == "bias" else "weights")] = params[i].copy()
                seen[(layer, f"{kind}_grads")] = g["params"][i]
                seen[(layer, f"{kind}_updates")] = -LR * g["params"][i]
                params[i] = params[i] - np.float32(LR) * g["params"][i]
            steps.append(seen)
    return steps


def _check(collect: Collect, step: int, seen: dict[tuple[str, str], np.ndarray]) -> None:
    for (layer, topic), value in seen.items():
        if layer == "":
            metric = "train_accuracy" if topic == "accuracy" else "loss"
            got = collect.value(step=step, phase="train", metric=metric)
            assert got == pytest.approx(float(value), rel=1e-5, abs=1e-7), (step, metric)
            continue
        for metric, reference in (("mean", float(value.mean())), ("norm", float(np.linalg.norm(value)))):
            got = collect.value(step=step, phase="train", layer=layer, topic=topic, metric=metric)
            assert got == pytest.approx(reference, rel=1e-4, abs=1e-6), (step, layer, topic, metric)


def test_every_topic_at_every_step_matches_the_training_replayed_by_hand(collect: Collect) -> None:
    callback = SondeCallback(store=None, sinks=[collect], metrics=["mean", "norm", "loss", "train_accuracy"], every=1)
    fit(mlp(), callback, epochs=2)
    assert callback.probe is None
    assert sorted({r.step for r in collect.records if r.phase == "train"}) == list(range(8))
    for k, seen in enumerate(_replay(2)):
        _check(collect, k, seen)


def test_every_two_records_the_even_steps_and_leaves_training_unchanged(collect: Collect) -> None:
    plain, probed = mlp(), mlp()
    fit(plain, epochs=2)
    callback = SondeCallback(store=None, sinks=[collect], metrics=["mean", "norm", "loss", "train_accuracy"], every=2)
    fit(probed, callback, epochs=2)
    for a, b in zip(plain.get_weights(), probed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted({r.step for r in collect.records if r.phase == "train"}) == [0, 2, 4, 6]
    expected = _replay(2)
    for k in (0, 2, 4, 6):
        _check(collect, k, expected[k])
    assert "call" not in probed.get_layer("fc1").__dict__  # Keras's own again after fit
    assert not hasattr(probed, "_sonde_probe")
    probed.fit(*data(), verbose=0)  # and trains without the probe


def test_validation_is_its_own_phase_at_the_step_whose_weights_it_used(collect: Collect) -> None:
    callback = SondeCallback(store=None, sinks=[collect], metrics=["loss", "mean"])
    model = mlp()
    x, y = data()
    fit(model, callback, epochs=2, validation_data=(x[:32], y[:32]))
    assert sorted({r.step for r in collect.records if r.phase == "eval"}) == [4, 8]
    params = model.get_weights()  # the weights after step 7: those the eval at step 8 used
    batches = [_mlp_gradients(params, x[i:i + 16], y[i:i + 16])["loss"] for i in (0, 16)]
    assert collect.value(step=8, phase="eval", metric="loss") == pytest.approx(np.mean(batches), rel=1e-5)
    assert {r.topic for r in collect.records if r.phase == "eval"} >= {"activations", "inputs", "loss"}
    assert not any(r.topic.endswith("grads") for r in collect.records if r.phase == "eval")


def _conv_reference(params: list[np.ndarray], x: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Conv2D (3x3, valid, relu, channels last) -> Flatten -> Dense, mean squared error: the conv's
    output and the loss's gradients with respect to it and to the conv kernel, by the backend's
    own convolution and gradient function."""
    if BACKEND == "torch":
        import torch

        kernel, bias, w, b = (torch.tensor(p, requires_grad=True) for p in params)
        conv = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                                     kernel.permute(3, 2, 0, 1), bias)).permute(0, 2, 3, 1)
        loss = ((conv.reshape(len(x), -1) @ w + b - torch.from_numpy(target)) ** 2).mean()
        conv_grad, kernel_grad = torch.autograd.grad(loss, [conv, kernel])
        return {"activations": conv.detach().numpy(), "output_grads": conv_grad.numpy(),
                "weight_grads": kernel_grad.numpy()}
    import jax
    import jax.numpy as jnp

    def convolve(kernel: Any) -> Any:
        out = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(out + params[1])

    def head(conv: Any) -> Any:
        return jnp.mean((conv.reshape(len(x), -1) @ params[2] + params[3] - target) ** 2)

    conv = convolve(jnp.asarray(params[0]))
    return {"activations": np.asarray(conv), "output_grads": np.asarray(jax.grad(head)(conv)),
            "weight_grads": np.asarray(jax.grad(lambda k: head(convolve(k)))(jnp.asarray(params[0])))}


def test_a_convolution_matches_the_backends_own_convolution_and_gradient(collect: Collect) -> None:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(name="flatten"), keras.layers.Dense(2, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    rng = np.random.default_rng(5)
    x, target = rng.normal(size=(8, 6, 6, 2)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    reference = _conv_reference([w.copy() for w in model.get_weights()], x, target)
    model.fit(x, target, batch_size=8, epochs=1, verbose=0,
              callbacks=[SondeCallback(store=None, sinks=[collect], metrics=["mean", "norm"])])
    reference["weight_updates"] = -LR * reference["weight_grads"]
    for topic, value in reference.items():
        for metric, expected in (("mean", float(value.mean())), ("norm", float(np.linalg.norm(value)))):
            got = collect.value(step=0, layer="conv", topic=topic, metric=metric)
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (topic, metric)


def test_a_failure_inside_the_probe_leaves_training_as_it_was(
        collect: Collect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot record here")

    if BACKEND == "jax":  # the recording step cannot be traced: Keras's own step runs instead
        from sonde.probe.keras_jax import _JaxRecorder

        monkeypatch.setattr(_JaxRecorder, "layer_call", broken)
        said = "could not build the recording train step; training goes on unrecorded"
    else:  # every capture fails: each kind is reported once
        from sonde.probe.keras_torch import KerasTorchProbe

        monkeypatch.setattr(KerasTorchProbe, "publish", broken)
        said = "activations capture failed; training goes on without it"
    plain, probed = mlp(), mlp()
    fit(plain, epochs=1)
    with caplog.at_level("ERROR", logger="sonde"):
        fit(probed, SondeCallback(store=None, sinks=[collect], metrics=["norm"]), epochs=1)
    for a, b in zip(plain.get_weights(), probed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert said in caplog.text and "cannot record here" in caplog.text
    messages = [r.getMessage() for r in caplog.records if r.name == "sonde"]
    assert len(messages) == len(set(messages))  # each failure once, not once per step
