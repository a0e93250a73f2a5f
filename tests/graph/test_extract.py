"""sonde.graph: nodes, names, shapes and edges, checked against the real forward pass."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import pytest
import torch
from torch import nn

import sonde
from sonde.graph import Graph, GraphError
from sonde.probe.torch import TorchProbe
from sonde.records import Record
from sonde.sinks import Sink


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.bn(self.conv1(x))))
        return self.relu(y + x)  # the same ReLU twice: relu, relu:2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.layer1 = nn.Sequential(Block(8), Block(8), Block(8))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        x = torch.flatten(x.mean((2, 3)), 1)
        return self.fc(self.drop(x))


def _is_dag(g: Graph) -> bool:
    indegree = {n.name: 0 for n in g.leaves()}
    for _, dst in g.edges:
        indegree[dst] += 1
    ready = [n for n, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for src, dst in g.edges:
            if src == node:
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
    return seen == len(indegree)


def _real_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """Output shape of every module call, from plain hooks on a real forward (independent of sonde)."""
    shapes: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, a: object, out: torch.Tensor, name: str = name) -> None:
            counts[name] = counts.get(name, 0) + 1
            shapes[name if counts[name] == 1 else f"{name}:{counts[name]}"] = list(out.shape)

        handles.append(module.register_forward_hook(hook))
    model(x)
    for h in handles:
        h.remove()
    return shapes


def test_sequential_nodes_and_edges() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    g = sonde.graph(model, torch.zeros(16, 4))
    assert [n.name for n in g.nodes] == ["input", "0", "1", "2", "output"]
    assert [n.kind for n in g.nodes] == ["input", "module", "module", "module", "output"]
    assert g["0"].op == "Linear" and g["0"].params == {"weight": [8, 4], "bias": [8]} and g["0"].num_params == 40
    assert g["2"].output_shapes == [[16, 2]] and g["2"].dtypes == ["float32"]
    assert g.edges == [("input", "0"), ("0", "1"), ("1", "2"), ("2", "output")]
    assert g.device == "meta"


def test_residual_network_names_shapes_and_edges() -> None:
    model = Net()
    x = torch.randn(2, 3, 16, 16)
    g = sonde.graph(model, x)
    real = _real_shapes(model, x)
    modules = {n.name: n for n in g.nodes if n.kind == "module"}
    assert set(modules) == set(real)
    for name, shape in real.items():
        assert modules[name].output_shapes == [shape], name
    assert g["layer1.0"].parent == "layer1" and g["layer1.0.conv1"].parent == "layer1.0"
    assert g["layer1.0.relu:2"].parent == "layer1.0"
    add = g["layer1.0/add"]
    assert add.kind == "function" and add.op == "add" and add.parent == "layer1.0"
    assert ("stem", "layer1.0/add") in g.edges and ("layer1.0.conv2", "layer1.0/add") in g.edges
    assert ("layer1.0/add", "layer1.0.relu:2") in g.edges and ("layer1.0.relu:2", "layer1.1.conv1") in g.edges
    assert g["flatten"].trivial and g["mean"].output_shapes == [[2, 8]]
    assert _is_dag(g)
    assert g["layer1"].num_params == sum(p.numel() for p in model.layer1.parameters())


class Layers(Sink):
    name = "layers"

    def __init__(self) -> None:
        self.layers: set[str] = set()

    def write(self, records: Sequence[Record]) -> None:
        self.layers.update(r.layer for r in records)


def test_names_match_the_probe_layer_names() -> None:
    model = Net()
    x = torch.randn(2, 3, 16, 16)
    sink = Layers()
    with TorchProbe(model, store=None, sinks=[sink], topics=["activations"], metrics=["mean"]):
        model(x)
    probed = sink.layers
    leaves = {n.name for n in sonde.graph(model, x).leaves() if n.kind == "module"}
    assert probed == leaves
    assert "layer1.2.relu:2" in probed


def test_a_forward_left_on_the_instance_runs_on_the_copy() -> None:
    """Lightning's DDP strategy redirects a module's forward through its instance and leaves the
    module's own bound ``forward`` there: the trace must still run the copy's submodules."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)  # type: ignore[no-any-return]

    model = Wrapper()
    model.forward = model.forward  # type: ignore[method-assign]  # what the redirect leaves behind
    leaves = {n.name for n in sonde.graph(model, torch.zeros(2, 3)).leaves() if n.kind == "module"}
    assert leaves == {"net.0", "net.1"}


def test_model_is_left_untouched_and_real_fallback_restores_randomness() -> None:
    class DataDependent(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # reads a value: impossible on the meta device
                x = x * 2
            return super().forward(x)

    model = DataDependent().train()
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    g = sonde.graph(model, x)
    assert g.device == "real" and "mul" in g
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics unchanged
    assert torch.equal(rng, torch.get_rng_state())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_tuple_and_dict_inputs_and_outputs() -> None:
    class TwoInTwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(5, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
            s = self.a(x) + self.b(y)
            return {"sum": s, "parts": (self.a(x), torch.cat([s, s], 1))}

    model = TwoInTwoOut()
    for example in ((torch.zeros(2, 3), torch.zeros(2, 5)), {"x": torch.zeros(2, 3), "y": torch.zeros(2, 5)}):
        g = sonde.graph(model, example)
        key = "0" if isinstance(example, tuple) else "x"
        assert g[f"input.{key}"].output_shapes == [[2, 3]]
        assert {n.name for n in g.nodes if n.kind == "output"} == {"output.sum", "output.parts.0", "output.parts.1"}
        assert g["output.parts.1"].output_shapes == [[2, 8]]
        assert ("a:2", "output.parts.0") in g.edges and ("cat", "output.parts.1") in g.edges
        assert ("add", "cat") in g.edges and ("a", "add") in g.edges and ("b", "add") in g.edges


def test_untraceable_forward_names_the_operation() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.fc(x), torch.zeros(3, 7)], 1)

    with pytest.raises(GraphError, match="'cat' in the model's top-level forward failed"):
        sonde.graph(Broken(), torch.zeros(2, 4))
    with pytest.raises(GraphError, match="expects a torch.nn.Module"):
        sonde.graph(lambda x: x, torch.zeros(1))  # type: ignore[arg-type]


def test_collapse_prune_fold_and_json_round_trip() -> None:
    g = sonde.graph(Net(), torch.randn(2, 3, 16, 16))
    top = g.collapse(1)
    assert [n.name for n in top.nodes] == ["input", "stem", "layer1", "mean", "flatten", "drop", "fc", "output"]
    assert top.edges[:3] == [("input", "stem"), ("stem", "layer1"), ("layer1", "mean")]
    blocks = g.collapse(2)
    assert ("layer1.0", "layer1.1") in blocks.edges and "layer1.0.conv1" not in blocks
    one = g.collapse(modules=["layer1.1"])
    assert ("layer1.0.relu:2", "layer1.1") in one.edges and ("layer1.1", "layer1.2.conv1") in one.edges
    pruned = g.prune()
    assert "flatten" not in pruned and ("mean", "drop") in pruned.edges
    folded = g.fold()
    assert folded["layer1.0"].repeat == 3 and folded["layer1.0"].members == ["layer1.0", "layer1.1", "layer1.2"]
    assert ("stem", "layer1.0") in folded.edges and ("layer1.0", "mean") in folded.edges
    assert "layer1.1" not in folded and "layer1.0.conv1" not in folded
    data = json.loads(g.to_json())
    assert Graph.from_dict(data).to_dict() == g.to_dict()
    assert {"name", "kind", "op", "parent", "output_shapes"} <= set(data["nodes"][0])
    with pytest.raises(ValueError, match="names no node"):
        g.collapse(modules=["nope"])


def test_transformers_models_from_configs() -> None:
    import transformers  # in the test extra: built from configs, no download
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    gpt = transformers.GPT2LMHeadModel(config)
    g = sonde.graph(gpt, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    assert g.device in ("meta", "fake")  # transformers' mask code reads values unless the tensors are fake
    assert g["lm_head"].output_shapes == [[1, 8, 100]] and g["input.input_ids"].dtypes == ["int64"]
    assert ("lm_head", "output.logits") in g.edges
    assert g.fold()["transformer.h.0"].repeat == 3
    bert_config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=100)
    bert = transformers.BertModel(bert_config)
    ids = torch.zeros(1, 8, dtype=torch.long)
    b = sonde.graph(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert b["encoder.layer.1.output.dense"].output_shapes == [[1, 8, 32]]
    assert b.fold()["encoder.layer.0"].repeat == 2
    assert _is_dag(b)
    assert b.device == "fake"  # BERT reads its attention mask on meta tensors; fake tensors let it skip that
    real = sonde.graph(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, device="real")
    modules = [(n.name, n.output_shapes) for n in b.nodes if n.kind == "module"]
    assert modules == [(n.name, n.output_shapes) for n in real.nodes if n.kind == "module"]
    with pytest.raises(GraphError, match=r"'bool' .* failed"):
        sonde.graph(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, device="meta")


def test_what_a_module_refers_to_is_shared_not_copied() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()  # stands for a trainer, a data loader, an open file: copy.deepcopy fails
            self.fc = nn.Linear(3, 3)
            self.head = nn.Linear(3, 3)
            self.head.weight = self.fc.weight  # tied

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with self.lock:
                return self.head(self.fc(x))

    model = Holder()
    g = sonde.graph(model, torch.zeros(2, 3))
    assert [n.name for n in g.nodes] == ["input", "fc", "head", "output"]
    assert g.num_params == 3 * 3 + 3 + 3  # the tied weight once
    assert not model.lock.locked()
