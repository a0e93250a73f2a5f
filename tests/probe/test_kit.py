"""The adapter kit (``sonde.probe.kit``): keywords, naming, the first-tensor search, the
weight-vs-bias rule, parameter publishing, and a whole adapter for a toy framework built from it."""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
from typing import Any

import numpy as np
import pytest
import torch

from collect import Collect
from sonde.errors import ConfigError, LayerFilterError
from sonde.probe import kit
from sonde.probe.core import Probe


def test_calls_after_the_first_are_numbered_until_the_pass_ends() -> None:
    names = kit.CallNames()
    assert [names("relu"), names("fc"), names("relu"), names("relu")] == ["relu", "fc", "relu:2", "relu:3"]
    names.clear()
    assert names("relu") == "relu"


@dataclasses.dataclass
class Output:
    mask: Any
    hidden: Any


def test_first_leaf_goes_depth_first_through_containers() -> None:
    x, h, c = torch.ones(2), torch.zeros(2), torch.full((2,), 3.0)
    is_float = lambda t: isinstance(t, torch.Tensor) and t.is_floating_point()  # noqa: E731
    assert kit.first_leaf((x, (h, c)), is_float) is x  # an LSTM's (output, (h, c))
    assert kit.first_leaf({"ids": torch.ones(2, dtype=torch.long), "logits": c}, is_float) is c
    assert kit.first_leaf(Output(mask=torch.ones(2, dtype=torch.bool), hidden=h), is_float) is h
    assert kit.first_leaf(("text", 3, None), is_float) is None
    flat = lambda v: [i for part in v for i in part]  # noqa: E731
    assert kit.first_leaf([[1], [2, 3]], lambda v: isinstance(v, int) and v > 1, flatten=flat) == 2
    assert kit.first_leaf(x, is_float) is x


def test_replace_leaf_rebuilds_each_container_as_its_own_type() -> None:
    pair = collections.namedtuple("pair", "a b")
    old, new = object(), object()
    replaced = kit.replace_leaf([1, (old, {"k": 2}), pair(3, old)], old, new)
    assert replaced == [1, (new, {"k": 2}), pair(3, new)] and type(replaced[2]) is pair
    assert kit.replace_leaf(Output(mask=1, hidden=old), old, new) == Output(mask=1, hidden=new)
    assert kit.replace_leaf(old, old, new) is new


@pytest.mark.parametrize(("name", "topic"), [
    ("bias", "biases"), ("0.bias", "biases"), ("lstm.bias_ih_l0", "biases"), ("weight", "weights"),
    ("kernel", "weights"), ("in_proj_weight", "weights"), ("bias.weight", "weights"), ("gamma", "weights"),
])
def test_a_parameter_whose_own_name_starts_with_bias_is_a_bias(name: str, topic: str) -> None:
    assert kit.param_topic(name) == topic


def test_the_reference_signature_takes_every_keyword_of_the_kit_in_its_order() -> None:
    from sonde.probe.torch import TorchProbe

    params = [p for p in inspect.signature(TorchProbe.__init__).parameters if p in kit.KEYWORDS]
    assert params == list(kit.KEYWORDS)


def test_unexpected_keywords_are_named_with_what_is_taken() -> None:
    kit.check_keywords("Callback", ["run", "every"])
    with pytest.raises(ConfigError, match=r"Callback got unexpected keyword\(s\) evry; it takes budget, depth, "
                                          r"every, .*sinks, store, topics \(note\)"):
        kit.check_keywords("Callback", ["run", "evry"], note=" (note)")


# -- a toy framework: layers are objects holding numpy arrays, a model is a dict of them --------


class Layer:
    def __init__(self, n_in: int, n_out: int) -> None:
        self.weight = np.full((n_out, n_in), 0.5, dtype=np.float32)
        self.bias = np.zeros(n_out, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


class ToyProbe(Probe):
    """What an adapter is: find the layers, hook their calls and the optimizer, hand tensors over."""

    framework = "toy"

    def __init__(self, model: dict[str, Layer], *, stepped: bool = True, **options: Any) -> None:
        self.model = model
        named = [(name, layer, 1, True, True) for name, layer in model.items()]
        layers = kit.choose_layers(named, options.get("layers"), options.get("depth"), "ToyNet")
        shapes = {name: {"weight": layer.weight.shape, "bias": layer.bias.shape} for name, layer in layers.items()}
        super().__init__(model, layers, shapes, optimizer=None, **options)
        self.count_steps(stepped, keyword="stepped", example="True")
        self.call_names = kit.CallNames()
        self.param_publisher = kit.ParameterPublisher(self, torch.from_numpy)

    def forward(self, x: np.ndarray, order: list[str]) -> np.ndarray:
        self.begin_train_forward()
        self.call_names.clear()
        for name in order:
            call = self.call_names(name)
            x = self.model[name](x)
            if name in self.layers and self.wants("activations"):
                self.publish(call, "activations", torch.from_numpy(x), phase="train")
        return x

    def sgd_step(self, grads: dict[str, dict[str, np.ndarray]], lr: float = 0.1) -> None:
        """``(layer, parameter name, parameter)``, the parameter here a ``(layer name, attribute)`` key."""
        params = [(name, attr, (name, attr)) for name in self.layers for attr in ("weight", "bias")]
        value = lambda key: getattr(self.layers[key[0]], key[1])  # noqa: E731
        self.begin_optimizer_step()
        self.param_publisher.before_step(params, value=value, grad=lambda key: grads[key[0]][key[1]],
                                         updated=lambda key: True)
        for name, attr, key in params:
            setattr(self.layers[name], attr, value(key) - lr * grads[name][attr])
        self.param_publisher.after_step(value)
        self.optimizer_stepped()


def test_an_adapter_for_a_new_framework_is_made_of_the_kit(collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    model = {"fc": Layer(2, 3), "out": Layer(3, 3)}
    with pytest.raises(TypeError, match="unexpected keyword argument.*evry"):
        ToyProbe(model, store=None, evry=2)
    with pytest.raises(LayerFilterError, match="names look like 'fc', 'out'"):
        ToyProbe(model, store=None, layers=["conv*"])
    with caplog.at_level(logging.WARNING, logger="sonde"), ToyProbe(model, store=None, stepped=False):
        assert "no stepped= given, so weights, gradients and updates are unavailable" in caplog.text
    p = ToyProbe(model, store=None, sinks=[collect], metrics=["mean"], every=1)
    assert p.info.config == {"every": "1", "depth": None, "optimizer": None}
    assert [(i.name, i.param_shapes) for i in p.info.layers] == [
        ("fc", {"weight": [3, 2], "bias": [3]}), ("out", {"weight": [3, 3], "bias": [3]})]
    grads = {"fc": {"weight": np.ones((3, 2), np.float32), "bias": np.ones(3, np.float32)},
             "out": {"weight": np.ones((3, 3), np.float32), "bias": np.ones(3, np.float32)}}
    with p:
        p.forward(np.ones((4, 2), np.float32), ["fc", "out", "out"])
        p.sgd_step(grads)
    means = {(r.layer, r.topic): r.value for r in collect.records if r.metric == "mean"}
    assert means[("fc", "activations")] == pytest.approx(1.0)
    assert means[("out:2", "activations")] == pytest.approx(2.25)
    assert means[("fc", "weights")] == pytest.approx(0.5) and means[("fc", "biases")] == pytest.approx(0.0)
    assert means[("out", "weight_grads")] == pytest.approx(1.0)
    assert means[("out", "weight_updates")] == pytest.approx(-0.1)
    assert means[("fc", "bias_updates")] == pytest.approx(-0.1)
    assert {r.step for r in collect.records} == {0}
