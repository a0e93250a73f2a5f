"""``sonde.mxnet.probe`` on Gluon blocks (run in the MXNet environment: ``make test-mxnet``):
every topic at every step checked against the same training computed by hand in numpy; eval
passes as their own phase; hybridized blocks and bad input named clearly; the blocks' own
methods back after close; the adapter's docstrings."""

from __future__ import annotations

import doctest
import logging

import numpy as np
import pytest

from collect import Collect
from sonde.errors import ConfigError, LayerFilterError, ProbeError

mx = pytest.importorskip("mxnet")
from mxnet import autograd, gluon, nd  # noqa: E402

import sonde.mxnet  # noqa: E402

LR = 0.1


def _net() -> gluon.nn.Sequential:
    mx.random.seed(0)
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(8, activation="tanh", in_units=5), gluon.nn.Dense(3, in_units=8))
    net.initialize(mx.init.Xavier())
    return net


def _data(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [(rng.normal(size=(6, 5)).astype("float32"), rng.normal(size=(6, 3)).astype("float32"))
            for _ in range(steps)]


def _train(net: gluon.Block, trainer: gluon.Trainer, data: list[tuple[np.ndarray, np.ndarray]], p: object) -> None:
    for x, t in data:
        with autograd.record():
            out = net(nd.array(x))
            loss = ((out - nd.array(t)) ** 2).mean()
        loss.backward()
        trainer.step(1)
        p.log(loss=loss)  # type: ignore[attr-defined]


def _replay(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
            data: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[tuple[str, str], np.ndarray]]:
    """The same SGD steps in numpy: forward, backward and update by hand."""
    steps = []
    for x, t in data:
        a1 = np.tanh(x @ w1.T + b1)
        out = a1 @ w2.T + b2
        dout = 2 * (out - t) / out.size
        dw2, db2, da1 = dout.T @ a1, dout.sum(0), dout @ w2
        dh = da1 * (1 - a1 ** 2)
        dw1, db1 = dh.T @ x, dh.sum(0)
        steps.append({("0", "inputs"): x, ("0", "activations"): a1, ("1", "inputs"): a1, ("1", "activations"): out,
                      ("0", "output_grads"): da1, ("1", "output_grads"): dout,
                      ("0", "weights"): w1, ("0", "biases"): b1, ("1", "weights"): w2, ("1", "biases"): b2,
                      ("0", "weight_grads"): dw1, ("0", "bias_grads"): db1, ("1", "weight_grads"): dw2,
                      ("1", "bias_grads"): db2, ("0", "weight_updates"): -LR * dw1, ("0", "bias_updates"): -LR * db1,
                      ("1", "weight_updates"): -LR * dw2, ("1", "bias_updates"): -LR * db2,
                      ("", "loss"): np.array(((out - t) ** 2).mean())})
        w1, b1, w2, b2 = w1 - LR * dw1, b1 - LR * db1, w2 - LR * dw2, b2 - LR * db2
    return steps


def test_every_topic_at_every_step_matches_numpy_by_hand(collect: Collect) -> None:
    net = _net()
    start = [p.data().asnumpy().astype(np.float64) for p in net.collect_params().values()]
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR})
    data = _data(3)
    with sonde.mxnet.probe(net, trainer=trainer, store=None, sinks=[collect], metrics=["mean", "norm", "loss"]) as p:
        _train(net, trainer, data, p)
    assert sorted({r.step for r in collect.records}) == [0, 1, 2]
    for k, seen in enumerate(_replay(*start, data)):
        for (layer, topic), value in seen.items():
            if layer == "":
                assert collect.value(step=k, metric="loss") == pytest.approx(float(value), rel=1e-5)
                continue
            for metric, reference in (("mean", value.mean()), ("norm", np.linalg.norm(value))):
                got = collect.value(step=k, layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(float(reference), rel=1e-4, abs=1e-6), (k, layer, topic, metric)


def test_eval_passes_are_their_own_phase_and_blocks_are_restored(collect: Collect) -> None:
    net = _net()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR})
    data = _data(2)
    with sonde.mxnet.probe(net, trainer=trainer, store=None, sinks=[collect], metrics=["mean"]) as p:
        _train(net, trainer, data[:1], p)
        out = net(nd.array(data[1][0]))  # outside autograd.record(): an evaluation
    assert sorted({(r.phase, r.step) for r in collect.records}) == [("eval", 1), ("train", 0)]
    assert collect.value(phase="eval", layer="1", topic="activations", metric="mean") == pytest.approx(
        float(out.asnumpy().mean()), rel=1e-5)
    assert all("forward" not in vars(b) for b in [net, *net._children.values()]) and "step" not in vars(trainer)


def test_hybridized_blocks_and_bad_input_are_named(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ProbeError, match="expects a gluon.Block, got builtins.dict"):
        sonde.mxnet.probe({"not": "a block"}, store=None)
    net = _net()
    with pytest.raises(ConfigError, match="trainer= expects a gluon.Trainer"):
        sonde.mxnet.probe(net, trainer="sgd", store=None)
    with pytest.raises(LayerFilterError, match="names look like '0', '0.act', '1'"):
        sonde.mxnet.probe(net, layers=["conv*"], store=None)
    net.hybridize()
    with caplog.at_level(logging.WARNING, logger="sonde"):
        with sonde.mxnet.probe(net, store=None, metrics=["mean"]):
            pass
    assert "hybridized" in caplog.text and "probe before calling hybridize()" in caplog.text


@pytest.mark.parametrize("name", ["sonde.mxnet", "sonde.probe.mxnet"])
def test_docstring_examples(name: str) -> None:
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
