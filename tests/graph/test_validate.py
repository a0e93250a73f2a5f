"""Graph documents are checked before they are stored or drawn: every graph sonde writes passes
(PyTorch, transformers, Keras, their collapsed, pruned and folded views, through JSON), and each
kind of malformed document is refused naming what was expected, at ``PUT /runs/{run}/graph`` as a
422 and in the graph view as a GraphError (never a hang on a parent cycle)."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import httpx
import pytest
import torch
from torch import nn

import sonde
from nets import Block
from sonde.errors import GraphError
from sonde.graph.validate import validate_graph
from sonde.server.app import create_app
from sonde.server.ui.graph_view import GraphView
from sonde.store import open_store


class _Shared(nn.Module):
    """A module called twice, functions between modules, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.act(self.fc(x))
        h = self.act(self.fc(h)) + x
        return {"logits": self.head(torch.flatten(h, 1)), "hidden": h}


def _torch_graphs() -> list[Any]:
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), Block(8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 10))
    graphs = [sonde.graph(cnn.eval(), torch.zeros(1, 3, 8, 8)), sonde.graph(_Shared(), torch.zeros(2, 4)),
              sonde.graph(nn.LSTM(4, 8, batch_first=True), torch.zeros(2, 5, 4)),
              sonde.graph(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval(), torch.zeros(1, 6, 16))]
    return [view for g in graphs for view in (g, g.prune(), g.fold(), g.collapse(1), g.collapse(2))]


def test_every_graph_sonde_writes_passes() -> None:
    for graph in _torch_graphs():
        doc = json.loads(graph.to_json())  # what the remote sink sends and the store keeps
        assert validate_graph(doc) is doc
        assert len(GraphView(doc).visible().nodes) > 0


def test_transformers_graphs_pass() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    graph = sonde.graph(transformers.GPT2LMHeadModel(config), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    for view in (graph, graph.fold(), graph.prune()):
        validate_graph(json.loads(view.to_json()))


def test_keras_graphs_pass() -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    from sonde.graph.keras import keras_graph

    encoder = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, activation="relu", name="dense")],
                               name="encoder")
    shared = keras.layers.Dense(6, name="shared")
    x = keras.Input((8,), name="x")
    h = encoder(x)
    s = keras.layers.Add(name="plus")([shared(shared(h)), h])
    model = keras.Model(x, keras.layers.Dense(3, name="head")(s + 1.0), name="net")
    graph = keras_graph(model)
    assert any(-1 in shape for n in graph.nodes for shape in n.output_shapes)  # the unknown batch dimension
    validate_graph(json.loads(graph.to_json()))


def _doc() -> dict[str, Any]:
    return {"version": 1, "model": "Net", "device": "meta", "num_params": 40, "nodes": [
        {"name": "input", "kind": "input", "op": "Tensor", "parent": None, "output_shapes": [[2, 4]],
         "dtypes": ["float32"]},
        {"name": "body", "kind": "module", "op": "Sequential", "parent": None, "output_shapes": [[2, 8]],
         "num_params": 40},
        {"name": "body.0", "kind": "module", "op": "Linear", "parent": "body", "output_shapes": [[2, 8]],
         "params": {"weight": [8, 4], "bias": [8]}, "num_params": 40},
        {"name": "body/add", "kind": "function", "op": "add", "parent": "body", "output_shapes": [[2, 8]],
         "trivial": False, "repeat": 1, "members": []},
        {"name": "output", "kind": "output", "op": "Tensor", "parent": None, "output_shapes": [[2, 8]]}],
        "edges": [["input", "body.0"], ["body.0", "body/add"], ["body/add", "output"]]}


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


BAD = [
    ("not an object", [1, 2], "graph must be an object"),
    ("an unknown key", _set(_doc(), ("meta",), {}), "the keys a graph may have"),
    ("another version", _set(_doc(), ("version",), 2), "version must be 1"),
    ("nodes not a list", _set(_doc(), ("nodes",), {"a": 1}), "nodes must be a list"),
    ("a node not an object", _set(_doc(), ("nodes", 0), "input"), "graph node 0 must be an object"),
    ("a crafted kind", _set(_doc(), ("nodes", 1, "kind"), 'module" onmouseover="alert(1)'), "kind must be one of"),
    ("a missing name", _set(_doc(), ("nodes", 1, "name"), ""), "name must be a non-empty string"),
    ("a name not a string", _set(_doc(), ("nodes", 1, "name"), ["body"]), "name must be a non-empty string"),
    ("an op not a string", _set(_doc(), ("nodes", 2, "op"), {"x": 1}), "op must be a string"),
    ("an unknown node key", _set(_doc(), ("nodes", 2, "onload"), "x"), "the keys a node may have"),
    ("a shape of strings", _set(_doc(), ("nodes", 2, "output_shapes"), [["2", "8"]]), "output_shapes[0][0] must be"),
    ("a shape not a list", _set(_doc(), ("nodes", 2, "output_shapes"), [8]), "output_shapes[0] must be a shape"),
    ("a float count", _set(_doc(), ("nodes", 2, "num_params"), 1.5), "num_params must be an integer"),
    ("a negative count", _set(_doc(), ("num_params",), -1), "num_params must be an integer >= 0"),
    ("a bool count", _set(_doc(), ("nodes", 2, "num_params"), True), "num_params must be an integer"),
    ("a parameter shape of strings", _set(_doc(), ("nodes", 2, "params"), {"weight": "8x4"}), "must be a shape"),
    ("trivial not a bool", _set(_doc(), ("nodes", 3, "trivial"), "no"), "trivial must be true or false"),
    ("repeat zero", _set(_doc(), ("nodes", 3, "repeat"), 0), "repeat must be an integer >= 1"),
    ("a dtype not a string", _set(_doc(), ("nodes", 0, "dtypes"), [32]), "dtypes[0] must be a string"),
    ("a parent that is not there", _set(_doc(), ("nodes", 2, "parent"), "nope"), "parent must be None or the name"),
    ("a parent that is no module", _set(_doc(), ("nodes", 2, "parent"), "input"), "parent must be None or the name"),
    ("a parent cycle", _set(_set(_doc(), ("nodes", 1, "parent"), "body.0"), ("nodes", 2, "kind"), "module"),
     "must not lead back"),
    ("a duplicate name", _set(_doc(), ("nodes", 4, "name"), "input"), "must be unique"),
    ("an edge to nowhere", _set(_doc(), ("edges", 0), ["input", "ghost"]), "must join two nodes"),
    ("an edge of three", _set(_doc(), ("edges", 0), ["input", "body.0", "output"]), "[source, target] pair"),
    ("a too long model", _set(_doc(), ("model",), "x" * 1001), "model must be a string of at most 1000"),
]


@pytest.mark.parametrize(("doc", "words"), [(doc, words) for _, doc, words in BAD], ids=[b[0] for b in BAD])
def test_a_malformed_graph_is_refused_naming_what_was_expected(doc: Any, words: str) -> None:
    with pytest.raises(GraphError) as refused:
        validate_graph(doc)
    assert words in str(refused.value) and "got" in str(refused.value)


def test_the_api_answers_422_and_keeps_the_graph_it_had(tmp_path: Any) -> None:
    good = json.loads(sonde.graph(_Shared(), torch.zeros(2, 4)).to_json())
    with open_store(tmp_path / "sonde.db") as store:
        app = create_app(store, ui=False)

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
                out = [await client.post("/api/v1/runs", json={"name": "r"}),
                       await client.put("/api/v1/runs/r/graph", json=good)]
                for _, doc, _ in BAD[1:]:
                    out.append(await client.put("/api/v1/runs/r/graph", json=doc))
                return out

        created, stored, *refused = asyncio.run(go())
        assert created.status_code == 201 and stored.status_code == 200
        for (what, _, words), r in zip(BAD[1:], refused, strict=True):
            assert r.status_code == 422 and words in r.json()["error"], (what, r.text)
        assert store.get_graph("r") == good


def test_the_graph_view_refuses_a_stored_graph_it_cannot_draw() -> None:
    """A graph written into the store without the API's check (by hand, or by another writer)."""
    cycle = _set(_set(_doc(), ("nodes", 1, "parent"), "body.0"), ("nodes", 2, "kind"), "module")
    with pytest.raises(GraphError, match="must not lead back"):
        GraphView(cycle)
    with pytest.raises(GraphError, match="kind must be one of"):
        GraphView(_set(_doc(), ("nodes", 1, "kind"), "<img src=x onerror=alert(1)>"))
