"""A Keras model's graph, read from Keras's own layer graph: names as the Keras probe names layers,
nested models as compound nodes, ops between layers as functions, shared layers once per call; it
reaches the store when a probed fit starts, and a subclassed model is a clear error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sonde.errors import GraphError
from sonde.store import open_store

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("sonde.keras records the TensorFlow backend; unset KERAS_BACKEND", allow_module_level=True)

from sonde.graph.keras import keras_graph  # noqa: E402
from sonde.keras import SondeCallback  # noqa: E402


def _functional() -> Any:
    encoder = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, activation="relu", name="dense")],
                               name="encoder")
    shared = keras.layers.Dense(6, name="shared")
    x = keras.Input((8,), name="x")
    h = encoder(x)
    a = shared(shared(h))  # one layer, two calls
    s = keras.layers.Add(name="plus")([a, h])  # a residual join
    out = keras.layers.Dense(3, name="head")(s + 1.0)  # `+ 1.0` is a Keras op, not a layer
    return keras.Model(x, out, name="net")


def test_sequential_nodes_edges_shapes_and_parameters() -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="fc1"), keras.layers.Dense(2, name="fc2")])
    graph = keras_graph(model)
    assert [n.name for n in graph.nodes] == ["input", "fc1", "fc2", "output"]
    assert graph.edges == [("input", "fc1"), ("fc1", "fc2"), ("fc2", "output")]
    assert graph["fc1"].params == {"kernel": [4, 8], "bias": [8]}
    assert graph["fc1"].num_params == 4 * 8 + 8
    assert graph.num_params == model.count_params() == 4 * 8 + 8 + 8 * 2 + 2


def test_nested_models_residuals_ops_and_shared_layers() -> None:
    graph = keras_graph(_functional())
    kinds = {n.name: (n.kind, n.op, n.parent) for n in graph.nodes}
    assert kinds == {
        "input": ("input", "Input", None),
        "encoder": ("module", "Sequential", None),
        "encoder.dense": ("module", "Dense", "encoder"),
        "shared": ("module", "Dense", None),
        "shared:2": ("module", "Dense", None),
        "plus": ("module", "Add", None),
        "add": ("function", "Add", None),
        "head": ("module", "Dense", None),
        "output": ("output", "Output", None),
    }
    assert set(graph.edges) == {
        ("input", "encoder.dense"), ("encoder.dense", "shared"), ("shared", "shared:2"),
        ("shared:2", "plus"), ("encoder.dense", "plus"), ("plus", "add"), ("add", "head"), ("head", "output"),
    }
    assert graph["encoder.dense"].output_shapes == [[-1, 6]]
    # the views of the PyTorch graph work on it: collapsing the encoder joins its edges
    collapsed = graph.collapse(1)
    assert ("input", "encoder") in collapsed.edges and ("encoder", "plus") in collapsed.edges


def test_a_probed_fit_stores_the_graph_under_the_probes_layer_names(tmp_path: Path) -> None:
    model = _functional()
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    model.fit(x, y, batch_size=16, verbose=0,
              callbacks=[SondeCallback(run="net", store=tmp_path / "s.db", metrics=["mean"])])
    with open_store(tmp_path / "s.db") as store:
        graph = store.get_graph("net")
        layers = set(store.load("net")["layer"]) - {""}
    modules = {n["name"] for n in graph["nodes"] if n["kind"] == "module"}
    assert layers == {"encoder.dense", "shared", "shared:2", "plus", "head"}
    assert layers <= modules


def test_a_subclassed_model_has_no_graph_and_its_fit_is_recorded_all_the_same(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Net(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fc = keras.layers.Dense(2, name="fc")

        def call(self, x: Any) -> Any:
            return self.fc(x)

    model = Net()
    with pytest.raises(GraphError, match="subclassed .*Keras model"):
        keras_graph(model)
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 3), dtype="float32")
    with caplog.at_level(logging.INFO, logger="sonde"):
        model.fit(x, np.ones((8, 2), dtype="float32"), verbose=0,
                  callbacks=[SondeCallback(run="sub", store=tmp_path / "s.db", metrics=["mean"])])
    assert "no graph view for this run" in caplog.text
    with open_store(tmp_path / "s.db") as store:
        assert set(store.load("sub")["layer"]) >= {"fc"}
