"""The graph's data: :class:`Node`, :class:`Graph` and its JSON form.

A graph is a *compound* graph. Every module call and every functional operation between
modules is a node; a node's ``parent`` is the module call it ran in, so the nodes form a tree
(the module hierarchy) and ``edges`` join the tree's *leaves* in the direction tensors flow.
:meth:`Graph.collapse`, :meth:`Graph.prune` and :meth:`Graph.fold` return new graphs whose
edges join the leaves of the reduced tree, so any view of the network is a graph of the same kind.

JSON (``Graph.to_dict()``; fields left out when they hold their default)::

    {"version": 1, "model": "ResNet", "device": "meta", "num_params": 11689512,
     "nodes": [{"name": "layer1.0.conv1", "kind": "module", "op": "Conv2d", "parent": "layer1.0",
                "output_shapes": [[1, 64, 56, 56]], "dtypes": ["float32"],
                "params": {"weight": [64, 64, 3, 3]}, "num_params": 36864,
                "trivial": false, "repeat": 1, "members": []}, ...],
     "edges": [["maxpool", "layer1.0.conv1"], ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from sonde.errors import GraphError

__all__ = ["Graph", "GraphError", "Node"]

KINDS = ("module", "function", "input", "output")


@dataclass
class Node:
    """One node of a :class:`Graph`.

    Attributes:
        name: unique name: a module call (``layer1.0.conv1``, ``act:2`` for a second call), a function
            (``layer1.0/add``, ``layer1.0/add:2``), ``input``/``input.0``/``input.ids``, ``output``/``output.0``.
        kind: ``"module"``, ``"function"``, ``"input"`` or ``"output"``.
        op: the module's class name or the function's name (``add``, ``cat``, ``flatten``).
        parent: the enclosing module call's name, None at the top level.
        output_shapes: the shape of every tensor the node produced, in output order.
        dtypes: their dtypes (``float32``), parallel to ``output_shapes``.
        params: module nodes: the module's own parameters (not its children's) by name, with shapes.
        num_params: module nodes: number of parameter elements, children included.
        trivial: a view, reshape, identity or inactive dropout, which :meth:`Graph.prune` removes.
        repeat: after :meth:`Graph.fold`, how many identical consecutive blocks this node stands for.
        members: after :meth:`Graph.fold`, the names of those blocks.

    Example:
        >>> Node("fc", "module", "Linear", None, [[8, 10]], ["float32"], {"weight": [10, 4]}, 40).name
        'fc'
    """

    name: str
    kind: str
    op: str
    parent: str | None = None
    output_shapes: list[list[int]] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    params: dict[str, list[int]] = field(default_factory=dict)
    num_params: int = 0
    trivial: bool = False
    repeat: int = 1
    members: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The node as JSON-ready dict; fields at their default are left out (except the contract's)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "op": self.op, "parent": self.parent,
                               "output_shapes": self.output_shapes}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in out and value not in (None, [], {}, 0, False) and not (f.name == "repeat" and value == 1):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Graph:
    """The topology of one forward pass: nodes (a module tree) and edges between its leaves.

    Build one with :func:`sonde.graph`; read it with ``.nodes``/``.edges`` or ``.to_json()``.

    Example:
        >>> import torch, sonde
        >>> g = sonde.graph(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.zeros(2, 4))
        >>> [n.name for n in g.nodes]
        ['input', '0', '1', 'output']
        >>> g.edges
        [('input', '0'), ('0', '1'), ('1', 'output')]
    """

    def __init__(self, nodes: Iterable[Node], edges: Iterable[tuple[str, str]], *, model: str = "",
                 device: str = "", num_params: int = 0) -> None:
        self.nodes: list[Node] = list(nodes)
        self.edges: list[tuple[str, str]] = list(edges)
        self.model = model
        self.device = device
        self.num_params = num_params  # distinct parameter elements of the whole model (tied weights once)
        self._by_name = {n.name: n for n in self.nodes}
        if len(self._by_name) != len(self.nodes):
            raise GraphError("graph has duplicate node names")

    def __repr__(self) -> str:
        return f"Graph({self.model or 'model'}: {len(self.nodes)} nodes, {len(self.edges)} edges)"

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    # -- structure -----------------------------------------------------------------------------
    def children(self, name: str | None) -> list[Node]:
        """The nodes directly inside module call ``name`` (None: the top level), in call order."""
        return [n for n in self.nodes if n.parent == name]

    def depth(self, name: str) -> int:
        """1 for top-level nodes (as the probe's ``depth=1``), 2 for their children, and so on."""
        level, parent = 1, self._by_name[name].parent
        while parent is not None:
            level, parent = level + 1, self._by_name[parent].parent
        return level

    def leaves(self) -> list[Node]:
        """Nodes with no children: the ones ``edges`` connect."""
        parents = {n.parent for n in self.nodes}
        return [n for n in self.nodes if n.name not in parents]

    # -- views ---------------------------------------------------------------------------------
    def _merged(self, owner: dict[str, str], drop: set[str], updates: dict[str, Node] | None = None) -> Graph:
        """Nodes not in ``drop`` (replaced by ``updates``), edges mapped through ``owner``, deduplicated."""
        updates = updates or {}
        nodes = [updates.get(n.name, n) for n in self.nodes if n.name not in drop]
        edges: dict[tuple[str, str], None] = {}
        for src, dst in self.edges:
            a, b = owner.get(src, src), owner.get(dst, dst)
            if a != b:
                edges[(a, b)] = None
        return Graph(nodes, edges, model=self.model, device=self.device,
                     num_params=self.num_params)

    def collapse(self, depth: int | None = None, *, modules: Iterable[str] = ()) -> Graph:
        """A graph in which modules are single boxes.

        Args:
            depth: every node deeper than ``depth`` is merged into its ancestor at that depth; as the probe's
                ``depth=``, ``collapse(1)`` shows one box per top-level module. None: no depth limit.
            modules: names of further module calls to show as one box each.

        Example:
            >>> g = sonde.graph(resnet, x)                  # doctest: +SKIP
            >>> [n.name for n in g.collapse(1).nodes]     # doctest: +SKIP
            ['input', 'conv1', 'bn1', 'relu', 'maxpool', 'layer1', ..., 'fc', 'output']
        """
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise ValueError(f"collapse(depth) expects None or an int >= 1, got {depth!r}")
        boxes = set(modules)
        unknown = sorted(boxes - set(self._by_name))
        if unknown:
            raise ValueError(f"collapse(modules=...) names no node of the graph: {unknown}; names look like "
                             f"{[n.name for n in self.nodes if n.kind == 'module'][:5]}")
        owner: dict[str, str] = {}
        for node in self.nodes:
            chain = [node.name]
            parent = node.parent
            while parent is not None:
                chain.append(parent)
                parent = self._by_name[parent].parent
            chain.reverse()  # top-level ancestor first
            for level, name in enumerate(chain, start=1):
                if name in boxes or (depth is not None and level == depth):
                    if name != node.name:
                        owner[node.name] = name
                    break
        return self._merged(owner, set(owner))

    def prune(self) -> Graph:
        """A graph without trivial leaves (views, reshapes, identities, inactive dropout); edges bridge them."""
        leaves = {n.name for n in self.leaves()}
        gone = {n.name for n in self.nodes if n.trivial and n.name in leaves}
        succ: dict[str, list[str]] = {}
        pred: dict[str, list[str]] = {}
        for src, dst in self.edges:
            succ.setdefault(src, []).append(dst)
            pred.setdefault(dst, []).append(src)

        def sources(name: str, seen: set[str]) -> list[str]:
            out: list[str] = []
            for p in pred.get(name, []):
                if p in gone and p not in seen:
                    seen.add(p)
                    out.extend(sources(p, seen))
                elif p not in gone:
                    out.append(p)
            return out

        edges: dict[tuple[str, str], None] = {}
        for src, dst in self.edges:
            if dst in gone:
                continue
            for s in sources(dst, set()) if src in gone else [src]:
                edges[(s, dst)] = None
        # Containers left empty by pruning (a Sequential of one Identity) stay, as leaves.
        return Graph([n for n in self.nodes if n.name not in gone], edges, model=self.model, device=self.device,
                     num_params=self.num_params)

    def fold(self) -> Graph:
        """A graph in which runs of identical consecutive sibling blocks are one box (``repeat``, ``members``).

        Twelve identical transformer layers become one node ``h.0`` with ``repeat == 12``; a ResNet stage's
        blocks after the first (which has the downsample) become one node with ``repeat == n - 1``.
        """
        kids: dict[str | None, list[Node]] = {}
        for node in self.nodes:
            kids.setdefault(node.parent, []).append(node)
        signature: dict[str, tuple[Any, ...]] = {}
        for node in reversed(self.nodes):  # children come after their parent: compute them first
            signature[node.name] = (node.kind, node.op, _shape_key(node.output_shapes),
                                    tuple(sorted((k, tuple(v)) for k, v in node.params.items())),
                                    tuple(signature[c.name] for c in kids.get(node.name, [])))
        owner: dict[str, str] = {}
        updates: dict[str, Node] = {}
        for siblings in kids.values():
            i = 0
            while i < len(siblings):
                j = i + 1
                first = siblings[i]
                has_children = first.name in kids
                while (has_children and j < len(siblings) and siblings[j].kind == "module"
                       and signature[siblings[j].name] == signature[first.name]):
                    j += 1
                if j - i >= 2:
                    run = siblings[i:j]
                    updates[first.name] = replace(first, repeat=j - i, members=[n.name for n in run],
                                                  output_shapes=run[-1].output_shapes, dtypes=run[-1].dtypes)
                    names = {n.name for n in run}
                    for node in self.nodes:
                        top = self._ancestor_in(node.name, names)
                        if top is not None and node.name != first.name:
                            owner[node.name] = first.name
                i = j
        return self._merged(owner, set(owner), updates)

    def _ancestor_in(self, name: str, names: set[str]) -> str | None:
        current: str | None = name
        while current is not None:
            if current in names:
                return current
            current = self._by_name[current].parent
        return None

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"version", "model", "device", "nodes": [...], "edges": [[src, dst], ...]}``."""
        return {"version": 1, "model": self.model, "device": self.device, "num_params": self.num_params,
                "nodes": [n.to_dict() for n in self.nodes], "edges": [list(e) for e in self.edges]}

    def to_json(self, indent: int | None = None) -> str:
        """The graph as a JSON string (compact unless ``indent`` is given)."""
        separators = (",", ":") if indent is None else None
        return json.dumps(self.to_dict(), indent=indent, separators=separators)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Graph:
        """Inverse of :meth:`to_dict` (what :meth:`Store.get_graph` returns becomes a Graph again)."""
        if not isinstance(data, dict) or "nodes" not in data or "edges" not in data:
            raise GraphError(f"expected a graph dict with 'nodes' and 'edges', got {type(data).__name__}")
        return cls((Node.from_dict(n) for n in data["nodes"]), (tuple(e) for e in data["edges"]),
                   model=data.get("model", ""), device=data.get("device", ""),
                   num_params=int(data.get("num_params", 0)))


def _shape_key(shapes: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    # Blocks are identical whatever their batch size: keep the feature dimensions.
    return tuple(tuple(s[1:]) for s in shapes)
