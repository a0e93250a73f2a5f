"""Pictures of a :class:`~sonde.graph.model.Graph`: a text tree and a layered SVG.

Both read only the graph (or its JSON), so a stored run's graph is drawn the same way offline.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

from sonde.graph.model import Graph, Node

__all__ = ["format_tree", "readable_view", "to_svg"]


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _shapes(node: Node) -> str:
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
        params = _count(node.num_params * node.repeat) if node.num_params else ""
        dtype = f" {node.dtypes[0]}" if node.dtypes and node.dtypes[0] != "float32" else ""
        rows.append((indent + _label(node), node.op, _shapes(node) + dtype, params))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    header = (f"{graph.model or 'model'}: {len(graph.nodes)} nodes, {len(graph.edges)} edges, "
              f"{_count(total)} parameters (traced on {graph.device or '?'})")
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


def _layers(graph: Graph) -> dict[str, int]:
    """Longest-path layer of every leaf (inputs at 0), in topological order of the edges."""
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


def _colour(value: float, low: float, high: float) -> str:
    """Viridis-like ramp from dark blue (low) to yellow (high)."""
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
    layer = _layers(graph)
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
        fill = _colour(value, low, high) if value is not None else {
            "input": "#e8f0fe", "output": "#e8f0fe", "function": "#f5f5f5"}.get(node.kind, "#fff4e0")
        text = "#ffffff" if value is not None and _is_dark(fill) else "#222222"
        tip = html.escape(f"{node.name} ({node.op}) {_shapes(node)}" + (f" = {value:.4g}" if value is not None else ""))
        label = html.escape(_label(node) if len(_label(node)) <= 24 else "…" + _label(node)[-23:])
        parts.append(f'<g><title>{tip}</title><rect x="{x:.0f}" y="{y:.0f}" width="{width}" height="{height}" rx="5" '
                     f'fill="{fill}" stroke="#999"/>'
                     f'<text x="{x + 6:.0f}" y="{y + 15:.0f}" fill="{text}">{label}</text>'
                     f'<text x="{x + 6:.0f}" y="{y + 30:.0f}" fill="{text}" font-size="9">{html.escape(node.op)}</text>'
                     '</g>')
    parts.append("</svg>")
    return "".join(parts)


def _is_dark(colour: str) -> bool:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 128
