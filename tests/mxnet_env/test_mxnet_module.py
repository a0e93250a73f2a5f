"""``sonde.mxnet.probe_module`` on an ``mx.mod.Module`` (run in the MXNet environment:
``make test-mxnet``): every topic at every step of ``fit`` and of a hand-written loop checked
against the same SGD training computed by hand in numpy; ``every=2`` reads no array on the
steps it skips; the module's methods and the executor's monitor back after close."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from collect import Collect
from sonde.errors import LayerFilterError, ProbeError

mx = pytest.importorskip("mxnet")

import sonde.mxnet  # noqa: E402

LR = 0.1
BATCH = 6


def _symbol() -> object:
    data, label = mx.sym.Variable("data"), mx.sym.Variable("label")
    fc1 = mx.sym.FullyConnected(data, num_hidden=8, name="fc1")
    tanh1 = mx.sym.Activation(fc1, act_type="tanh", name="tanh1")
    fc2 = mx.sym.FullyConnected(tanh1, num_hidden=3, name="fc2")
    return mx.sym.LinearRegressionOutput(fc2, label, name="out")


def _module() -> tuple[object, list[np.ndarray]]:
    """A bound, initialised module and its starting parameters (fc1 weight, bias, fc2 weight, bias)."""
    mx.random.seed(0)
    module = mx.mod.Module(_symbol(), data_names=["data"], label_names=["label"])
    module.bind(data_shapes=[("data", (BATCH, 5))], label_shapes=[("label", (BATCH, 3))])
    module.init_params(mx.init.Xavier())
    args = module.get_params()[0]
    start = [args[n].asnumpy().astype(np.float64) for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    return module, start


def _data(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [(rng.normal(size=(BATCH, 5)).astype("float32"), rng.normal(size=(BATCH, 3)).astype("float32"))
            for _ in range(steps)]


def _batch(x: np.ndarray, t: np.ndarray) -> object:
    return mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(t)])


def _replay(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
            data: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[tuple[str, str], np.ndarray]]:
    """The same steps in numpy. LinearRegressionOutput's gradient is (out - label) / outputs per
    sample, summed over the batch; Module's SGD scales it by rescale_grad = 1 / batch size."""
    steps = []
    for x, t in data:
        h1 = x @ w1.T + b1
        a1 = np.tanh(h1)
        out = a1 @ w2.T + b2
        dout = (out - t) / t.shape[1]
        dw2, db2, da1 = dout.T @ a1, dout.sum(0), dout @ w2
        dh1 = da1 * (1 - a1 ** 2)
        dw1, db1 = dh1.T @ x, dh1.sum(0)
        step = LR / BATCH
        steps.append({("fc1", "inputs"): x, ("fc1", "activations"): h1, ("fc1", "output_grads"): dh1,
                      ("tanh1", "inputs"): h1, ("tanh1", "activations"): a1, ("tanh1", "output_grads"): da1,
                      ("fc2", "inputs"): a1, ("fc2", "activations"): out, ("fc2", "output_grads"): dout,
                      ("out", "inputs"): out, ("out", "activations"): out,
                      ("fc1", "weights"): w1, ("fc1", "biases"): b1, ("fc2", "weights"): w2, ("fc2", "biases"): b2,
                      ("fc1", "weight_grads"): dw1, ("fc1", "bias_grads"): db1,
                      ("fc2", "weight_grads"): dw2, ("fc2", "bias_grads"): db2,
                      ("fc1", "weight_updates"): -step * dw1, ("fc1", "bias_updates"): -step * db1,
                      ("fc2", "weight_updates"): -step * dw2, ("fc2", "bias_updates"): -step * db2,
                      ("", "loss"): np.array(((out - t) ** 2).mean())})
        w1, b1, w2, b2 = w1 - step * dw1, b1 - step * db1, w2 - step * dw2, b2 - step * db2
    return steps


def _check(collect: Collect, replay: list[dict[tuple[str, str], np.ndarray]], steps: list[int],
           loss: bool = True) -> None:
    assert sorted({r.step for r in collect.records if r.phase == "train"}) == steps
    seen_topics = {(r.layer, r.topic) for r in collect.records if r.layer}
    assert seen_topics == {k for k in replay[0] if k[0]}  # no output_grads for the loss head, nothing else
    for k in steps:
        for (layer, topic), value in replay[k].items():
            if layer == "":
                if loss:
                    assert collect.value(step=k, metric="loss") == pytest.approx(float(value), rel=1e-5)
                continue
            for metric, reference in (("mean", value.mean()), ("norm", np.linalg.norm(value))):
                got = collect.value(step=k, phase="train", layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(float(reference), rel=1e-4, abs=1e-6), (k, layer, topic, metric)


def _loop(module: object, data: list[tuple[np.ndarray, np.ndarray]], p: object) -> None:
    for x, t in data:
        module.forward(_batch(x, t), is_train=True)  # type: ignore[attr-defined]
        module.backward()  # type: ignore[attr-defined]
        module.update()  # type: ignore[attr-defined]
        out = module.get_outputs()[0]  # type: ignore[attr-defined]
        p.log(loss=((out - mx.nd.array(t)) ** 2).mean())  # type: ignore[attr-defined]


def test_hand_written_loop_every_topic_at_every_step_matches_numpy(collect: Collect) -> None:
    module, start = _module()
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": LR})
    data = _data(3)
    with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean", "norm", "loss"]) as p:
        _loop(module, data, p)
    _check(collect, _replay(*start, data), [0, 1, 2])


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "bound-by-fit"])
def test_fit_every_topic_at_every_step_matches_numpy(collect: Collect, bound: bool) -> None:
    module, start = _module()
    if not bound:  # probed before fit binds it: the executor appears at the first forward
        params = dict(zip(("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), start, strict=True))
        module = mx.mod.Module(_symbol(), data_names=["data"], label_names=["label"])
    data = _data(3)
    train = mx.io.NDArrayIter(np.concatenate([x for x, _ in data]), np.concatenate([t for _, t in data]),
                              batch_size=BATCH, shuffle=False, label_name="label")
    with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean", "norm"]):
        module.fit(train, num_epoch=1, optimizer="sgd", optimizer_params={"learning_rate": LR}, eval_metric="mse",
                   arg_params=None if bound else {k: mx.nd.array(v) for k, v in params.items()})
    _check(collect, _replay(*start, data), [0, 1, 2], loss=False)


def test_eval_pass_is_its_own_phase_at_the_next_step(collect: Collect) -> None:
    module, start = _module()
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": LR})
    data = _data(2)
    with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean"]) as p:
        _loop(module, data[:1], p)
        module.forward(_batch(*data[1]), is_train=False)
    after_one = _replay(*start, data)[1]  # step 1's weights: those the evaluation used
    assert sorted({(r.phase, r.step) for r in collect.records}) == [("eval", 1), ("train", 0)]
    assert {r.topic for r in collect.records if r.phase == "eval"} == {"inputs", "activations"}
    for layer in ("fc1", "tanh1", "fc2"):
        got = collect.value(phase="eval", layer=layer, topic="activations", metric="mean")
        assert got == pytest.approx(float(after_one[(layer, "activations")].mean()), rel=1e-4, abs=1e-6)


def test_every_2_does_no_monitor_work_on_unrecorded_steps(collect: Collect, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between recorded steps the monitor only hands each array handle back, as ``mx.mon.Monitor``
    does between its intervals: no array is wrapped (``NDArray(handle, writable=False)``, the
    monitor's way) and none is read."""
    module, start = _module()
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": LR})
    data = _data(4)
    work: list[str] = []
    read, wrap = mx.nd.NDArray.to_dlpack_for_read, mx.nd.NDArray.__init__

    def counted_wrap(self: object, handle: object, writable: bool = True) -> None:
        if not writable:
            work.append("wrap")
        wrap(self, handle, writable)

    monkeypatch.setattr(mx.nd.NDArray, "to_dlpack_for_read", lambda self: (work.append("read"), read(self))[1])
    monkeypatch.setattr(mx.nd.NDArray, "__init__", counted_wrap)
    per_step = []
    with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean", "norm"], every=2):
        for x, t in data:
            batch = _batch(x, t)
            work.clear()
            module.forward(batch, is_train=True)
            module.backward()
            module.update()
            per_step.append(sorted(set(work)))
    assert per_step[1] == per_step[3] == [] and per_step[0] == per_step[2] == ["read", "wrap"]
    _check(collect, _replay(*start, data), [0, 2], loss=False)


def test_close_restores_the_module_and_the_users_monitor(collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    module, _ = _module()
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": LR})
    monitor = mx.mon.Monitor(1, pattern="fc1_output")
    module.install_monitor(monitor)
    executor = module._exec_group.execs[0]
    users = executor._monitor_callback
    data = _data(3)
    with caplog.at_level(logging.WARNING, logger="sonde"):
        with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean"]) as p:
            _loop(module, data[:2], p)
            assert executor._monitor_callback is not users
    assert "already has a monitor" in caplog.text
    assert "forward" not in vars(module) and "update" not in vars(module)
    assert executor._monitor_callback is users
    recorded = len(collect.records)
    monitor.tic()
    _loop(module, data[2:], type("NoLog", (), {"log": lambda self, **kw: None})())
    stats = monitor.toc()
    assert [name for _, name, _ in stats] == ["fc1_output"] and len(collect.records) == recorded


def test_close_without_a_monitor_leaves_training_untouched(collect: Collect) -> None:
    module, _ = _module()
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": LR})
    data = _data(3)
    with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean"]) as p:
        _loop(module, data[:1], p)
    recorded = len(collect.records)
    _loop(module, data[1:], type("NoLog", (), {"log": lambda self, **kw: None})())
    assert len(collect.records) == recorded
    with sonde.mxnet.probe_module(module, store=None, sinks=[collect], metrics=["mean"]) as p:  # probed again
        _loop(module, data[:1], p)
    assert len(collect.records) > recorded


def test_layer_names_and_bad_input() -> None:
    with pytest.raises(ProbeError, match="expects an mx.mod.Module, got builtins.dict"):
        sonde.mxnet.probe_module({"not": "a module"}, store=None)
    module, _ = _module()
    with pytest.raises(LayerFilterError, match="names look like 'fc1', 'tanh1', 'fc2', 'out'"):
        sonde.mxnet.probe_module(module, layers=["conv*"], store=None)
    with sonde.mxnet.probe_module(module, layers=["fc*"], store=None) as p:
        assert list(p.layers) == ["fc1", "fc2"] and p.params == {"fc1": ["fc1_weight", "fc1_bias"],
                                                                  "fc2": ["fc2_weight", "fc2_bias"]}
        assert [info.type for info in p.info.layers] == ["FullyConnected", "FullyConnected"]


def test_docstring_examples() -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("sonde.probe.mxnet_module"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 4
