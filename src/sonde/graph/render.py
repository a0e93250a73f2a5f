"""Pictures of a :class:`~sonde.graph.model.Graph`: a text tree and a layered SVG.

Both read only the graph (or its JSON), so a stored run's graph is drawn the same way offline.
The pieces they are made of (:func:`leaf_ranks`, :func:`viridis`, :func:`is_dark`,
:func:`format_count`, :func:`format_shapes`) are public: the dashboard's interactive graph view
draws its boxes with them, so both pictures agree.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

from sonde.graph.model import Graph, Node

__all__ = [
    "format_count",
    "format_shapes",
    "format_tree",
    "is_dark",
    "leaf_ranks",
    "readable_view",
    "to_svg",
    "viridis",
]


def format_count(n: int) -> str:
    """A parameter count as a box label shows it: ``950``, ``12.3k``, ``1.2M``.

    Example:
        >>> format_count(950), format_count(12_345), format_count(1_234_567)
        ('950', '12.3k', '1.2M')
    """
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def format_shapes(node: Node) -> str:
    """A node's output shapes as text (the first three; the count of the rest), ``""`` when unknown.

    Example:
        >>> format_shapes(Node("fc", kind="module", op="Linear", output_shapes=[[2, 8]]))
        '[2, 8]'
    """
    if not node.output_shapes:
        return ""
    text = ", ".join("[" + ", ".join(map(str, s)) + "]" for s in node.output_shapes[:3])
    return text + (f", … ({len(node.output_shapes)} tensors)" if len(node.output_shapes) > 3 else "")


def _label(node: Node) -> str:
    return node.name + (f" × {node.repeat}" if node.repeat > 1 else "")


def format_tree(graph: Graph) -> str:
    """The module tree as aligned text: name (× repeats), class or function, output shapes, parameters.

    Example:
        >>> import torch, sonde
        >>> print(format_tree(sonde.graph(torch.nn.Sequential(torch.nn.Linear(4, 8)), torch.zeros(2, 4))))
        Sequential: 3 nodes, 2 edges, 40 parameters (traced on meta)
        input   Tensor  [2, 4]
        0       Linear  [2, 8]  40
        output  Tensor  [2, 8]
    """
    total = graph.num_params
    rows = []
    for node in graph.nodes:
        indent = "  " * (graph.depth(node.name) - 1)
        params = format_count(node.num_params * node.repeat) if node.num_params else ""
        dtype = f" {node.dtypes[0]}" if node.dtypes and node.dtypes[0] != "float32" else ""
        rows.append((indent + _label(node), node.op, format_shapes(node) + dtype, params))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    header = (f"{graph.model or 'model'}: {len(graph.nodes)} nodes, {len(graph.edges)} edges, "
              f"{format_count(total)} parameters (traced on {graph.device or '?'})")
    lines = [header]
    for name, op, shapes, params in rows:
        lines.append(f"{name:<{widths[0]}}  {op:<{widths[1]}}  {shapes:<{widths[2]}}  {params}".rstrip())
    return "\n".join(lines)


def readable_view(graph: Graph, max_nodes: int = 80) -> Graph:
    """Folded, pruned, and collapsed to the deepest level whose picture has at most ``max_nodes`` boxes."""
    view = graph.prune().fold()
    deepest = max((view.depth(n.name) for n in view.nodes), default=1)
    for depth in range(deepest, 0, -1):
        candidate = view.collapse(depth)
        if len(candidate.leaves()) <= max_nodes or depth == 1:
            return candidate
    return view


def leaf_ranks(graph: Graph) -> dict[str, int]:
    """The column of every leaf in a left-to-right drawing: its longest path from an input (inputs at 0).

    Example:
        >>> g = Graph([Node("input", kind="input", op="Tensor"), Node("fc", kind="module", op="Linear"),
        ...            Node("output", kind="output", op="Tensor")], [("input", "fc"), ("fc", "output")])
        >>> leaf_ranks(g)
        {'input': 0, 'fc': 1, 'output': 2}
    """
    leaves = [n.name for n in graph.leaves()]
    succ: dict[str, list[str]] = {n: [] for n in leaves}
    indegree = dict.fromkeys(leaves, 0)
    for src, dst in graph.edges:
        if src in succ and dst in indegree:
            succ[src].append(dst)
            indegree[dst] += 1
    layer = dict.fromkeys(leaves, 0)
    ready = [n for n in leaves if indegree[n] == 0]
    while ready:
        node = ready.pop(0)
        for nxt in succ[node]:
            layer[nxt] = max(layer[nxt], layer[node] + 1)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    return layer


def viridis(value: float, low: float, high: float) -> str:
    """The fill of ``value`` on a viridis-like ramp from dark blue (``low``) to yellow (``high``), as ``#rrggbb``.

    A value that is not finite, or a scale with no width, takes the middle of the ramp.

    Example:
        >>> viridis(0.0, 0.0, 1.0), viridis(1.0, 0.0, 1.0)
        ('#440154', '#fde725')
    """
    t = 0.5 if high <= low or not math.isfinite(value) else (value - low) / (high - low)
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    pos = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    f = pos - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(stops[i], stops[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def to_svg(graph: Graph, values: Mapping[str, float] | None = None, *, width: int = 150, height: int = 38,
           standalone: bool = True) -> str:
    """A left-to-right layered drawing of the graph's leaves and edges, as a standalone SVG string.

    Args:
        graph: usually :func:`readable_view` of a graph.
        values: optional metric value per node name; nodes are coloured by it (viridis-like, low = dark).
        width, height: size of one box in pixels.
        standalone: declare the SVG namespace (a file of its own); inline in HTML it is not needed.

    Example:
        >>> svg = to_svg(readable_view(sonde.graph(model, x)))   # doctest: +SKIP
    """
    layer = leaf_ranks(graph)
    columns: dict[int, list[str]] = {}
    for name, col in layer.items():
        columns.setdefault(col, []).append(name)
    gap_x, gap_y = width + 50, height + 18
    pos: dict[str, tuple[float, float]] = {}
    rows = max((len(c) for c in columns.values()), default=1)
    for col, names in columns.items():
        offset = (rows - len(names)) * gap_y / 2
        for row, name in enumerate(names):
            pos[name] = (10 + col * gap_x, 10 + offset + row * gap_y)
    total_w = 20 + (max(columns, default=0) + 1) * gap_x
    total_h = 20 + rows * gap_y
    finite = [v for v in (values or {}).values() if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    xmlns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    parts = [f'<svg{xmlns} width="{total_w}" height="{total_h}" '
             f'viewBox="0 0 {total_w} {total_h}" font-family="sans-serif" font-size="11">',
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" markerHeight="6" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#888"/></marker></defs>']
    for src, dst in graph.edges:
        if src in pos and dst in pos:
            (x1, y1), (x2, y2) = pos[src], pos[dst]
            sx, sy, ex, ey = x1 + width, y1 + height / 2, x2, y2 + height / 2
            mid = (sx + ex) / 2
            parts.append(f'<path d="M{sx:.0f},{sy:.0f} C{mid:.0f},{sy:.0f} {mid:.0f},{ey:.0f} {ex:.0f},{ey:.0f}" '
                         'fill="none" stroke="#888" marker-end="url(#arrow)"/>')
    for name, (x, y) in pos.items():
        node = graph[name]
        value = (values or {}).get(name)
        fill = viridis(value, low, high) if value is not None else {
            "input": "#e8f0fe", "output": "#e8f0fe", "function": "#f5f5f5"}.get(node.kind, "#fff4e0")
        text = "#ffffff" if value is not None and is_dark(fill) else "#222222"
        shown = f" = {value:.4g}" if value is not None else ""
        tip = html.escape(f"{node.name} ({node.op}) {format_shapes(node)}" + shown)
        label = html.escape(_label(node) if len(_label(node)) <= 24 else "…" + _label(node)[-23:])
        parts.append(f'<g><title>{tip}</title><rect x="{x:.0f}" y="{y:.0f}" width="{width}" height="{height}" rx="5" '
                     f'fill="{fill}" stroke="#999"/>'
                     f'<text x="{x + 6:.0f}" y="{y + 15:.0f}" fill="{text}">{label}</text>'
                     f'<text x="{x + 6:.0f}" y="{y + 30:.0f}" fill="{text}" font-size="9">{html.escape(node.op)}</text>'
                     '</g>')
    parts.append("</svg>")
    return "".join(parts)


def is_dark(colour: str) -> bool:
    """Whether ``#rrggbb`` is dark enough that text on it should be white (perceived luminance < 50%).

    Example:
        >>> is_dark("#440154"), is_dark("#fde725")
        (True, False)
    """
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 128
