"""A Keras 3 model's :class:`~sonde.graph.model.Graph`, read from the layer graph Keras keeps.

A functional or ``Sequential`` model (built with its input shape) records which layer call
consumed which tensor; nothing runs to read it. Names follow :mod:`sonde.probe.keras`: layers by
name, dotted below nested models (``encoder.dense``), ``name:2`` for a layer's second call;
operations that are not layers (``x + 1`` is a Keras ``add`` op) are functions named
``<enclosing model>/<op>`` as in the PyTorch graph. Batch dimensions Keras leaves open (None) are
-1 in shapes. A subclassed model keeps no such graph: :func:`keras_graph` raises
:class:`~sonde.errors.GraphError` saying so.
"""

from __future__ import annotations

from typing import Any

import keras

from sonde.graph.model import Graph, GraphError, Node

__all__ = ["keras_graph"]


def _functional(model: Any) -> Any:
    """The model's functional graph (a ``Sequential`` keeps one once built), or None."""
    if hasattr(model, "_operations") and hasattr(model, "_nodes_by_depth"):
        return model
    inner = getattr(model, "_functional", None)
    return inner if inner is not None and hasattr(inner, "_operations") else None


def _shape(tensor: Any) -> list[int]:
    return [-1 if d is None else int(d) for d in tensor.shape]


def keras_graph(model: Any) -> Graph:
    """The topology of a functional or ``Sequential`` Keras model (no forward pass runs).

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="fc1"),
        ...                           keras.layers.Dense(2, name="fc2")])
        >>> graph = keras_graph(model)
        >>> [(n.name, n.output_shapes) for n in graph.nodes]
        [('input', [[-1, 4]]), ('fc1', [[-1, 8]]), ('fc2', [[-1, 2]]), ('output', [[-1, 2]])]
        >>> graph.edges
        [('input', 'fc1'), ('fc1', 'fc2'), ('fc2', 'output')]
    """
    root = _functional(model)
    if root is None:
        raise GraphError(f"{type(model).__name__} is a subclassed (or unbuilt) Keras model: Keras keeps no layer "
                         "graph for it to read; functional and Sequential models built with an Input have one")
    nodes: list[Node] = []
    edges: list[tuple[str, str]] = []
    # (id of a symbolic tensor) -> the leaf node that produced it
    producers: dict[int, str] = {}
    calls: dict[str, int] = {}

    def call_name(base: str) -> str:
        count = calls.get(base, 0) + 1
        calls[base] = count
        return base if count == 1 else f"{base}:{count}"

    def walk(functional: Any, prefix: str, parent: str | None, feeds: list[str] | None) -> list[str]:
        """Add the graph's calls; ``feeds``: the producers of its inputs (None at the top level).
        Returns the producers of its outputs."""
        inputs = list(functional.inputs)
        for position, tensor in enumerate(inputs):
            if feeds is None:
                layer = tensor._keras_history.operation
                name = "input" if len(inputs) == 1 else f"input.{layer.name}"
                nodes.append(Node(name, "input", "Input", None, [_shape(tensor)], [str(tensor.dtype)]))
                producers[id(tensor)] = name
            else:
                producers[id(tensor)] = feeds[position]
        for depth in sorted(functional._nodes_by_depth, reverse=True):
            for node in functional._nodes_by_depth[depth]:
                operation = node.operation
                if isinstance(operation, keras.layers.InputLayer):
                    continue
                sources = [producers[id(t)] for t in node.input_tensors if id(t) in producers]
                inner = _functional(operation) if isinstance(operation, keras.Model) else None
                is_layer = isinstance(operation, keras.layers.Layer)
                base = f"{prefix}{operation.name}" if is_layer else f"{parent or ''}/{operation.name}".lstrip("/")
                name = call_name(base)
                outputs = list(node.output_tensors)
                nodes.append(Node(
                    name, "module" if is_layer else "function", type(operation).__name__, parent,
                    [_shape(t) for t in outputs], [str(t.dtype) for t in outputs],
                    {v.name: _shape(v) for v in getattr(operation, "_trainable_variables", [])} if is_layer else {},
                    int(sum(int(v.numpy().size) for v in operation.weights)) if is_layer else 0,
                ))
                if inner is not None:
                    ends = walk(inner, name + ".", name, sources)
                    for tensor, end in zip(outputs, ends, strict=False):
                        producers[id(tensor)] = end
                    continue
                edges.extend((source, name) for source in dict.fromkeys(sources))
                for tensor in outputs:
                    producers[id(tensor)] = name
        return [producers[id(t)] for t in functional.outputs]

    ends = walk(root, "", None, None)
    outputs = list(root.outputs)
    for position, (tensor, end) in enumerate(zip(outputs, ends, strict=True)):
        name = "output" if len(outputs) == 1 else f"output.{position}"
        nodes.append(Node(name, "output", "Output", None, [_shape(tensor)], [str(tensor.dtype)]))
        edges.append((end, name))
    num_params = int(sum(int(v.numpy().size) for v in model.weights))
    return Graph(nodes, edges, model=type(model).__name__, device="keras", num_params=num_params)
