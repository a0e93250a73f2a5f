"""A TF1-style ``tf.Graph``'s :class:`~sonde.graph.model.Graph`: its name scopes and how tensors flow between them.

Nodes follow :mod:`sonde.probe.tensorflow`: one ``module`` node per probed scope (its scope path,
``model/conv1``), its parent the enclosing probed scope; the forward pass's placeholders are
``input`` nodes (``input`` or ``input.<name>`` when there are several), the loss the ``output``.
Edges join the leaf scopes in the direction tensors flow, through any ops outside a scope (an
activation applied between two scopes is part of the edge). Batch dimensions left open are -1.
"""

from __future__ import annotations

from typing import Any

from sonde.graph.model import Graph, GraphError, Node

__all__ = ["scope_graph"]


def _shape(tensor: Any) -> list[int]:
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else []
    return [-1 if d is None else int(d) for d in dims]


def scope_graph(graph: Any, scopes: list[str], forward: list[Any], loss: Any = None) -> Graph:
    """The scopes ``scopes`` of ``graph`` and the edges between them, read from the ops of the
    forward pass ``forward`` (in graph order); nothing runs.

    Example:
        >>> import tensorflow as tf
        >>> with tf.Graph().as_default() as graph:
        ...     x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        ...     with tf.compat.v1.variable_scope("fc1"):
        ...         h = tf.nn.relu(tf.matmul(x, tf.compat.v1.get_variable("kernel", [4, 3])))
        ...     with tf.compat.v1.variable_scope("fc2"):
        ...         y = tf.matmul(h, tf.compat.v1.get_variable("kernel", [3, 2]))
        ...     loss = tf.reduce_sum(y)
        >>> g = scope_graph(graph, ["fc1", "fc2"], graph.get_operations(), loss)
        >>> [(n.name, n.output_shapes) for n in g.nodes]
        [('input', [[-1, 4]]), ('fc1', [[-1, 3]]), ('fc2', [[-1, 2]]), ('output', [[]])]
        >>> g.edges
        [('input', 'fc1'), ('fc1', 'fc2'), ('fc2', 'output')]
    """
    if not scopes:
        raise GraphError("no name scope to draw")
    leaves = [s for s in scopes if not any(o.startswith(s + "/") for o in scopes)]
    by_depth = sorted(leaves, key=lambda s: -s.count("/"))

    def owner(op: Any) -> str | None:
        return next((s for s in by_depth if op.name.startswith(s + "/")), None)

    placeholders = [op for op in forward if op.type in ("Placeholder", "PlaceholderWithDefault")]
    inputs = {op: ("input" if len(placeholders) == 1 else f"input.{op.name}") for op in placeholders}
    sources: dict[Any, frozenset[str]] = {}

    def reached(op: Any) -> frozenset[str]:
        """The leaf scopes and inputs whose tensors reach ``op`` (iteratively: graphs are deep)."""
        todo = [op]
        while todo:
            top = todo[-1]
            if top in sources:
                todo.pop()
                continue
            if top in inputs:
                sources[top] = frozenset({inputs[top]})
                todo.pop()
                continue
            missing = [t.op for t in top.inputs if t.op not in sources]
            if missing:
                todo.extend(missing)
                continue
            found: set[str] = set()
            for t in top.inputs:
                own = owner(t.op)
                found |= {own} if own is not None else sources[t.op]
            sources[top] = frozenset(found)
            todo.pop()
        return sources[op]

    edges: dict[tuple[str, str], None] = {}
    outputs: dict[str, Any] = {}
    last: dict[str, Any] = {}
    in_forward = set(forward)
    for op in forward:
        own = owner(op)
        if own is None:
            continue
        for t in op.inputs:
            source = owner(t.op)
            for s in ({source} if source is not None else reached(t.op)):
                if s != own:
                    edges[(s, own)] = None
        for t in op.outputs:
            if t.dtype.is_floating and any(c in in_forward and owner(c) != own for c in t.consumers()):
                outputs[own] = t
            elif t.dtype.is_floating and own not in outputs:
                last[own] = t  # a scope whose tensors leave it nowhere: its last one
    nodes = [Node(name, "input", "Placeholder", None, [_shape(op.outputs[0])], [op.outputs[0].dtype.name])
             for op, name in inputs.items()]
    num_params = 0
    for scope in scopes:
        parent = next((p for p in sorted(scopes, key=lambda s: -len(s)) if scope.startswith(p + "/")), None)
        variables = [v for v in graph.get_collection("trainable_variables") if v.op.name.rpartition("/")[0] == scope]
        owned = [v for v in graph.get_collection("trainable_variables") if v.op.name.startswith(scope + "/")]
        size = sum(int(v.shape.num_elements() or 0) for v in owned)
        out = outputs.get(scope, last.get(scope))
        nodes.append(Node(scope, "module", "NameScope", parent, [_shape(out)] if out is not None else [],
                          [out.dtype.name] if out is not None else [],
                          {v.op.name.rsplit("/", 1)[-1]: _shape(v) for v in variables}, size))
        num_params += sum(int(v.shape.num_elements() or 0) for v in variables)
    if loss is not None:
        nodes.append(Node("output", "output", "Loss", None, [_shape(loss)], [loss.dtype.name]))
        own = owner(loss.op)
        for s in ({own} if own is not None else reached(loss.op)):
            edges[(s, "output")] = None
    return Graph(nodes, list(edges), model="Graph", device="tensorflow", num_params=num_params)
