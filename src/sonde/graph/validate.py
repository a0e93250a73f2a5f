"""Check a graph document (``Graph.to_dict()``'s JSON) before it is stored or drawn.

A graph reaches the server from any client (``PUT /api/v1/runs/{run}/graph``), so the server
checks it against the format :mod:`sonde.graph.model` writes: the known keys only, node kinds
from :data:`~sonde.graph.model.KINDS`, shapes and counts as integers, parents that are module
nodes of the same graph (a tree, no cycle), and edges between nodes it has. What is wrong is
named in a :class:`~sonde.errors.GraphError`, with what was expected and what was got.

Example:
    >>> doc = {"nodes": [{"name": "input", "kind": "input", "op": "Tensor", "parent": None,
    ...                   "output_shapes": [[1, 4]]},
    ...                  {"name": "fc", "kind": "module", "op": "Linear", "parent": None,
    ...                   "output_shapes": [[1, 2]], "params": {"weight": [2, 4]}, "num_params": 8}],
    ...        "edges": [["input", "fc"]]}
    >>> validate_graph(doc) is doc
    True
    >>> validate_graph({"nodes": [{"name": "x", "kind": "<b>", "op": "", "parent": None}], "edges": []})
    Traceback (most recent call last):
    ...
    sonde.errors.GraphError: graph node 0 ('x'): kind must be one of 'module', 'function', 'input', 'output'; got '<b>'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from sonde.errors import GraphError
from sonde.graph.model import KINDS

__all__ = ["MAX_EDGES", "MAX_NODES", "MAX_TEXT", "validate_graph"]

#: Most nodes in one graph (a GPT-2 traced to every function is a few thousand).
MAX_NODES = 200_000
#: Most edges in one graph.
MAX_EDGES = 1_000_000
#: Longest name, op, dtype, model or device string.
MAX_TEXT = 1000
_TOP = {"version", "model", "device", "num_params", "nodes", "edges"}
_NODE = {"name", "kind", "op", "parent", "output_shapes", "dtypes", "params", "num_params", "trivial", "repeat",
         "members"}


def _fail(where: str, expected: str, got: Any) -> NoReturn:
    raise GraphError(f"{where} {expected}; got {got!r:.80}")


def _size(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"


def _text(value: Any, where: str, *, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not empty and not value):
        _fail(where, f"must be a{'' if empty else ' non-empty'} string of at most {MAX_TEXT} characters", value)
    return value


def _int(value: Any, where: str, low: int) -> int:
    if type(value) is not int or value < low:  # bool is an int subclass: not a count
        _fail(where, f"must be an integer >= {low}", value)
    return value


def _shape(value: Any, where: str) -> None:
    # -1 is a dimension unknown when the graph was read (Keras' batch dimension).
    if not isinstance(value, list) or len(value) > 64:
        _fail(where, "must be a shape: a list of at most 64 integers", value)
    for i, dim in enumerate(value):
        _int(dim, f"{where}[{i}]", -1)


def _node(data: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        _fail(f"graph node {index}", "must be an object {name, kind, op, parent, output_shapes, ...}", data)
    name = _text(data.get("name"), f"graph node {index}: name", empty=False)
    where = f"graph node {index} ({name!r:.60})"
    unknown = sorted(map(str, set(data) - _NODE))
    if unknown:
        _fail(f"{where}:", f"the keys a node may have are {', '.join(sorted(_NODE))}", unknown)
    if data.get("kind") not in KINDS:
        _fail(f"{where}: kind", f"must be one of {', '.join(map(repr, KINDS))}", data.get("kind"))
    _text(data.get("op", ""), f"{where}: op")
    if data.get("parent") is not None:
        _text(data["parent"], f"{where}: parent", empty=False)
    shapes = data.get("output_shapes", [])
    if not isinstance(shapes, list):
        _fail(f"{where}: output_shapes", "must be a list of shapes (lists of integers)", shapes)
    for i, shape in enumerate(shapes):
        _shape(shape, f"{where}: output_shapes[{i}]")
    dtypes = data.get("dtypes", [])
    if not isinstance(dtypes, list):
        _fail(f"{where}: dtypes", "must be a list of strings", dtypes)
    for i, dtype in enumerate(dtypes):
        _text(dtype, f"{where}: dtypes[{i}]")
    params = data.get("params", {})
    if not isinstance(params, Mapping):
        _fail(f"{where}: params", "must be an object of parameter name -> shape", params)
    for key, shape in params.items():
        _shape(shape, f"{where}: params[{_text(key, f'{where}: a parameter name')!r:.60}]")
    _int(data.get("num_params", 0), f"{where}: num_params", 0)
    if type(data.get("trivial", False)) is not bool:
        _fail(f"{where}: trivial", "must be true or false", data.get("trivial"))
    _int(data.get("repeat", 1), f"{where}: repeat", 1)
    members = data.get("members", [])
    if not isinstance(members, list):
        _fail(f"{where}: members", "must be a list of node names", members)
    for i, member in enumerate(members):
        _text(member, f"{where}: members[{i}]", empty=False)
    return data


def validate_graph(doc: Any) -> dict[str, Any]:
    """``doc`` when it is a well-formed graph document; :class:`GraphError` naming the first problem.

    Args:
        doc: a decoded JSON object, as ``Graph.to_dict()`` writes it.

    Raises:
        GraphError: a key, type, kind, shape or reference is not what the format has.
    """
    if not isinstance(doc, Mapping):
        _fail("graph", "must be an object {nodes, edges, model, device, num_params, version}", type(doc).__name__)
    unknown = sorted(map(str, set(doc) - _TOP))
    if unknown:
        _fail("graph:", f"the keys a graph may have are {', '.join(sorted(_TOP))}", unknown)
    if "version" in doc and doc["version"] != 1:
        _fail("graph: version", "must be 1 (the format sonde.graph writes)", doc["version"])
    for key in ("model", "device"):
        _text(doc.get(key, ""), f"graph: {key}")
    _int(doc.get("num_params", 0), "graph: num_params", 0)
    nodes, edges = doc.get("nodes"), doc.get("edges")
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        _fail("graph: nodes", f"must be a list of at most {MAX_NODES} nodes", _size(nodes))
    if not isinstance(edges, list) or len(edges) > MAX_EDGES:
        _fail("graph: edges", f"must be a list of at most {MAX_EDGES} [source, target] pairs", _size(edges))
    checked = [_node(n, i) for i, n in enumerate(nodes)]
    kinds: dict[str, str] = {}
    for i, node in enumerate(checked):
        if node["name"] in kinds:
            _fail(f"graph node {i}: name", "must be unique in the graph", node["name"])
        kinds[node["name"]] = node["kind"]
    parents = {n["name"]: n.get("parent") for n in checked}
    for i, node in enumerate(checked):
        parent = node.get("parent")
        if parent is not None and kinds.get(parent) != "module":
            _fail(f"graph node {i} ({node['name']!r:.60}): parent", "must be None or the name of a module node "
                  "of this graph", parent)
    rooted: set[str] = set()  # nodes whose parent chain is known to reach the top level
    for start in parents:  # every chain ends at the top level: the module tree has no cycle
        chain = {start}
        current = parents[start]
        while current is not None and current not in rooted:
            if current in chain:
                _fail(f"graph node {start!r:.60}: parent", "must not lead back to the node (the modules form a "
                      "tree)", current)
            chain.add(current)
            current = parents[current]
        rooted.update(chain)
    for i, edge in enumerate(edges):
        if not (isinstance(edge, (list, tuple)) and len(edge) == 2 and all(isinstance(e, str) for e in edge)):
            _fail(f"graph edge {i}", "must be a [source, target] pair of node names", edge)
        for end in edge:
            if end not in kinds:
                _fail(f"graph edge {i}", "must join two nodes of the graph", end)
    return doc if isinstance(doc, dict) else dict(doc)
