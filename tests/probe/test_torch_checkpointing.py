"""Activation checkpointing: a recomputation in backward is not a call. Each layer is recorded once
per real forward, with the activations, output gradients and weight gradients of the same model
run without checkpointing (the reference, run in the test without a probe)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import sonde
from collect import Collect

METRICS = ["mean", "std", "max", "norm"]
TOPICS = ["activations", "output_grads", "weight_grads"]


class Blocks(nn.Module):
    """Two checkpointable blocks that share one activation module (called once in each segment)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode  # "off", "reentrant" or "non-reentrant"
        self.stem = nn.Linear(5, 8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.Tanh()

    def block(self, fc: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return self.act(fc(x))
        return checkpoint(lambda h: self.act(fc(h)), x, use_reentrant=self.mode == "reentrant")  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.fc2, self.block(self.fc1, self.stem(x))))


def summary(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().double().numpy()
    return {"mean": x.mean(), "std": x.std(), "max": x.max(), "norm": np.linalg.norm(x.ravel())}


def unprobed(model: Blocks, x: torch.Tensor) -> dict[tuple[str, str], dict[str, float]]:
    """Each call's activations and output gradient, and each layer's weight gradient, of an
    un-checkpointed run, caught by the test's own hooks (the shared ``act`` is ``act`` then ``act:2``)."""
    model = copy.deepcopy(model)
    model.mode = "off"
    found: dict[tuple[str, str], dict[str, float]] = {}
    calls: dict[str, int] = {}

    def hook(name: str) -> Any:
        def on_output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            call = name if calls[name] == 1 else f"{name}:{calls[name]}"
            found[(call, "activations")] = summary(out)
            out.register_hook(lambda g: found.__setitem__((call, "output_grads"), summary(g)))
        return on_output

    for name, module in model.named_children():
        module.register_forward_hook(hook(name))
    model(x).square().mean().backward()
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            found[(name, "weight_grads")] = summary(module.weight.grad)
    return found


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_a_recomputation_is_not_a_call_and_values_equal_an_unchecked_run(collect: Collect, mode: str) -> None:
    model = Blocks(mode)
    x = torch.randn(16, 5)
    expected = unprobed(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, metrics=METRICS, topics=TOPICS, sinks=[collect]):
        model(x).square().mean().backward()
        opt.step()
    recorded = {(r.layer, r.topic) for r in collect.records if r.step == 0}
    assert recorded == set(expected)  # no phantom fc1:2, act:3 ...
    assert {r.phase for r in collect.records} == {"train"}
    for (layer, topic), values in expected.items():
        for metric, value in values.items():
            got = collect.value(step=0, layer=layer, topic=topic, metric=metric)
            assert got == pytest.approx(value, rel=1e-5, abs=1e-8), (layer, topic, metric)


def hf_model(checkpointing: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.train()
    if checkpointing != "off":
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_hugging_face_gradient_checkpointing_records_what_the_plain_model_records(mode: str) -> None:
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(3))
    runs = {}
    for checkpointing in ("off", mode):
        model = hf_model(checkpointing)
        if checkpointing == "reentrant":
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        collect = Collect()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with sonde.probe(model, store=None, optimizer=opt, metrics=METRICS, topics=TOPICS, sinks=[collect]):
            model(input_ids=ids).last_hidden_state.square().mean().backward()
            opt.step()
        runs[checkpointing] = {(r.layer, r.topic, r.metric): r.value for r in collect.records}
        assert model.is_gradient_checkpointing == (checkpointing != "off")
    plain, checked = runs["off"], runs[mode]
    assert set(checked) == set(plain)  # the same layers and calls: no phantom ':2'
    assert not [k for k in checked if ":" in k[0]]
    assert any(k[0].startswith("encoder.layer.1.") and k[1] == "output_grads" for k in checked)
    for key, value in plain.items():
        assert checked[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
