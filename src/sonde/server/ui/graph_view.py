"""The graph view's model: which modules are collapsed, where boxes go, and what colour they get.

Pure Python (no NiceGUI), so the page (:mod:`sonde.server.ui.graph_page`) stays thin and this is
tested directly. A :class:`GraphView` holds a run's stored graph (pruned of views, reshapes and
identities) and the set of module calls shown as one box; only the visible boxes are laid out,
which keeps ResNet-152- and GPT-2-sized models responsive.

Colours come from the rows of :meth:`Store.heatmap` (the probe's layer names are the graph's module
names; a second call of a reused module, ``act:2``, takes its own row, or ``act``'s when it has none). A collapsed box
shows the **mean** of its leaf descendants' values by default (``how="max"`` shows the worst one).

Example:
    >>> view = GraphView(store.get_graph("mlp"))                      # doctest: +SKIP
    >>> view.toggle("layer1")                                         # doctest: +SKIP
    >>> drawing = draw(view.visible())                                # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sonde.graph.model import Graph, Node
from sonde.graph.render import format_count, format_shapes, is_dark, leaf_ranks, viridis
from sonde.graph.validate import validate_graph
from sonde.server.ui.markup import css_token, escape

__all__ = ["Drawing", "GraphView", "base_name", "draw", "ramp"]

BOX_W, BOX_H, GAP_X, GAP_Y = 150, 40, 48, 16
PAD = 36  # margin: frames grow past their boxes, wrapped edges turn outside them
BAND_TOP = PAD + 30  # room above the first band for the outermost frames' labels
_PLAIN = {"input": "#e3ecfb", "output": "#e3ecfb", "function": "#f2f4f7", "module": "#ffffff"}


def base_name(node: str) -> str:
    """The probe's layer name of a graph node: ``act:2`` (second call of ``act``) -> ``act``.

    Example:
        >>> base_name("blocks.0.act:2"), base_name("fc")
        ('blocks.0.act', 'fc')
    """
    head, sep, tail = node.rpartition(":")
    return head if sep and tail.isdigit() else node


def ramp(value: float | None, low: float, high: float, *, log: bool = False) -> str | None:
    """The fill of a node whose metric is ``value`` on a scale ``low``..``high`` (None: no value).

    Viridis-like, dark blue (low) to yellow (high); ``log`` spaces the colours by orders of magnitude
    (positive values only).

    Example:
        >>> ramp(0.0, 0.0, 1.0), ramp(1.0, 0.0, 1.0), ramp(None, 0.0, 1.0)
        ('#440154', '#fde725', None)
    """
    if value is None or not math.isfinite(value):
        return None
    if log:
        if value <= 0 or low <= 0 or high <= 0:
            return viridis(math.nan, 0.0, 0.0)
        value, low, high = math.log10(value), math.log10(low), math.log10(high)
    return viridis(value, low, high)


class GraphView:
    """A stored graph and the module calls currently shown as one box each.

    Args:
        graph: a :class:`Graph` or its JSON dict (what ``Store.get_graph`` returns).
        max_nodes: the first view collapses to the deepest level showing at most this many boxes (60 read
            well on a laptop screen once wrapped: ResNet-152 opens with one box per bottleneck block).

    Example:
        >>> g = {"nodes": [{"name": "input", "kind": "input", "op": "Tensor", "parent": None, "output_shapes": []},
        ...      {"name": "body", "kind": "module", "op": "Sequential", "parent": None, "output_shapes": []},
        ...      {"name": "body.0", "kind": "module", "op": "Linear", "parent": "body", "output_shapes": []}],
        ...      "edges": [["input", "body.0"]]}
        >>> view = GraphView(g, max_nodes=1)
        >>> [n.name for n in view.visible().leaves()], view.toggle("body"), [n.name for n in view.visible().leaves()]
        (['input', 'body'], 'expanded', ['input', 'body.0'])
    """

    def __init__(self, graph: Graph | Mapping[str, Any], *, max_nodes: int = 60) -> None:
        # A stored document is checked first (the API checks what it stores, other writers may not):
        # a malformed one fails here with a message, not a loop on a parent cycle or a crafted kind drawn.
        full = graph if isinstance(graph, Graph) else Graph.from_dict(validate_graph(graph))
        self.graph = full.prune()
        # Trivial layers pruned from the picture (flatten, dropout) still count in their box's colour.
        self._parent = {n.name: n.parent for n in full.nodes}
        self._all_leaves = [n.name for n in full.leaves()]
        self.max_nodes = max_nodes
        kids: dict[str | None, list[str]] = {}
        for node in self.graph.nodes:
            kids.setdefault(node.parent, []).append(node.name)
        self._kids = kids
        self.collapsed: set[str] = set()
        self._visible: Graph | None = None
        self._rows: dict[tuple[str, ...], dict[str, list[int]]] = {}
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def is_container(self, name: str) -> bool:
        """Whether ``name`` is a module call with nodes inside (it can be expanded and collapsed)."""
        return name in self._kids and name is not None

    def reset(self) -> None:
        """Back to the first view: the deepest level whose picture has at most ``max_nodes`` boxes."""
        deepest = max((self.graph.depth(n.name) for n in self.graph.nodes), default=1)
        for depth in range(deepest, 0, -1):
            boxes = {n.name for n in self.graph.nodes
                     if self.graph.depth(n.name) == depth and self.is_container(n.name)}
            self._set(boxes)
            if len(self.visible().leaves()) <= self.max_nodes:
                return

    def expand_all(self) -> None:
        """Every module expanded: one box per leaf node (for a big model, hundreds of boxes)."""
        self._set(set())

    def collapse_all(self) -> None:
        """Every top-level module as one box."""
        self._set({n for n in self._kids.get(None, []) if self.is_container(n)})

    def expand(self, name: str) -> None:
        """Show the nodes directly inside module ``name`` (its own containers stay collapsed)."""
        self._known(name)
        inner = {c for c in self._kids.get(name, []) if self.is_container(c)}
        self._set((self.collapsed - {name}) | inner)

    def collapse(self, name: str) -> None:
        """Show module ``name`` (and everything inside it) as one box."""
        self._known(name)
        if not self.is_container(name):
            raise ValueError(f"'{name}' has no nodes inside to collapse; expected a module such as "
                             f"{sorted(n for n in self._kids if n)[:3]}")
        self._set({c for c in self.collapsed if not self._inside(c, name)} | {name})

    def toggle(self, name: str) -> str:
        """What a click on box ``name`` does: expand a collapsed module, else collapse the module around it.

        Returns:
            ``"expanded"``, ``"collapsed"`` or ``""`` (a top-level node that is no module box: nothing to do).
        """
        self._known(name)
        if name in self.collapsed:
            self.expand(name)
            return "expanded"
        parent = self.graph[name].parent
        if parent is None:
            return ""
        self.collapse(parent)
        return "collapsed"

    def visible(self) -> Graph:
        """The graph as drawn: collapsed modules merged into one node each (its leaves are the boxes)."""
        if self._visible is None:
            self._visible = self.graph.collapse(modules=self.collapsed)
        return self._visible

    def owner(self, name: str) -> str | None:
        """The visible box that node ``name`` is drawn in (itself, or the collapsed module around it)."""
        if name not in self.graph:
            return None
        current: str | None = name
        found = name
        while current is not None:
            if current in self.collapsed:
                found = current
            current = self.graph[current].parent
        return found

    def _set(self, boxes: set[str]) -> None:
        # A box inside another box is not drawn; keep only the outermost ones so the state reads plainly.
        self.collapsed = {b for b in boxes if not any(self._inside(b, o) for o in boxes if o != b)}
        self._visible = None
        self._rows = {}

    def _inside(self, name: str, ancestor: str) -> bool:
        parent = self._parent.get(name)
        while parent is not None:
            if parent == ancestor:
                return True
            parent = self._parent.get(parent)
        return False

    def _known(self, name: str) -> None:
        if name not in self.graph:
            modules = [n.name for n in self.graph.nodes if n.kind == "module"][:3]
            raise ValueError(f"the graph has no node '{name}'; names look like {modules}")

    # -- metrics ---------------------------------------------------------------------------------
    def rows(self, layers: Sequence[str]) -> dict[str, list[int]]:
        """For every visible box, the heatmap rows (indices into ``layers``) its colour is made of.

        A box the probe recorded itself uses its own row; a collapsed box uses its leaf descendants' rows.
        """
        key = tuple(layers)
        if key in self._rows:
            return self._rows[key]
        index = {layer: i for i, layer in enumerate(layers)}
        out: dict[str, list[int]] = self._rows.setdefault(key, {})
        leaves = self._all_leaves
        for node in self.visible().leaves():
            own = index.get(node.name, index.get(base_name(node.name)))
            if own is not None:
                out[node.name] = [own]
                continue
            if node.name not in self.collapsed:
                continue
            found = sorted({index[b] for n in leaves if self._inside(n, node.name)
                            if (b := n if n in index else base_name(n)) in index})
            if found:
                out[node.name] = found
        return out

    def values(self, heatmap: Mapping[str, Any], column: int, how: str = "mean") -> dict[str, float]:
        """Every coloured box's value at step column ``column`` of ``heatmap`` (``Store.heatmap``'s dict).

        Args:
            how: ``"mean"`` or ``"max"`` of a collapsed box's leaf values (missing and NaN cells skipped).
        """
        if how not in ("mean", "max"):
            raise ValueError(f"how= expects 'mean' or 'max', got {how!r}")
        grid = heatmap.get("values") or []
        out: dict[str, float] = {}
        for name, idx in self.rows(heatmap.get("layers") or []).items():
            cells = [grid[i][column] for i in idx if 0 <= column < len(grid[i])]
            finite = [float(v) for v in cells if v is not None and math.isfinite(v)]
            if finite:
                out[name] = max(finite) if how == "max" else sum(finite) / len(finite)
        return out

    def alerts(self, alerts: Sequence[Mapping[str, Any]], upto: int | None = None) -> dict[str, list[str]]:
        """Alert messages by visible box (``Source.alerts`` rows: ``step``, ``layer``, ``message``), oldest first.

        Only alerts at or before step ``upto`` when given; alerts on layers the graph lacks are left out.
        """
        by_layer: dict[str, list[str]] = {n.name: [n.name] for n in self.graph.nodes}
        for node in self.graph.nodes:  # a layer the probe named without the call number: its first call
            by_layer.setdefault(base_name(node.name), [node.name])
        out: dict[str, list[str]] = {}
        for alert in sorted(alerts, key=lambda a: int(a.get("step", 0))):
            if upto is not None and int(alert.get("step", 0)) > upto:
                continue
            for first in by_layer.get(str(alert.get("layer", "")), [])[:1]:
                box = self.owner(first)
                if box is not None:
                    text = str(alert.get("message") or f"{alert.get('topic', '')} alert")
                    out.setdefault(box, []).append(f"step {alert.get('step')}: {text}")
        return out

    def frames(self) -> dict[str, list[str]]:
        """Every expanded module that has visible boxes inside, with those boxes (for :func:`draw`'s frames)."""
        out: dict[str, list[str]] = {}
        for node in self.visible().leaves():
            parent = node.parent
            while parent is not None:
                out.setdefault(parent, []).append(node.name)
                parent = self.graph[parent].parent
        return out

    def tooltip(self, name: str, lines: Sequence[str] = ()) -> str:
        """A box's hover card as HTML: name, class, shapes, parameters, then ``lines`` (metrics, alerts)."""
        node = self.graph[name]
        inner = sum(1 for n in self.graph.leaves() if self._inside(n.name, name)) if name in self.collapsed else 0
        rows = [f"<b>{escape(name)}</b> <span class='sg-op'>{escape(node.op)}</span>"]
        if node.output_shapes:
            rows.append(f"output {escape(format_shapes(node))}")
        if node.params:
            rows.append("params " + escape(", ".join(f"{k} {list(v)}" for k, v in node.params.items())))
        if node.num_params:
            rows.append(f"{format_count(node.num_params)} parameters" + (" inside" if inner else ""))
        if inner:
            rows.append(f"{inner} nodes inside · click to expand")
        elif node.parent is not None:
            rows.append(f"in {escape(node.parent)} · click to collapse it")
        return "<br>".join(rows + [str(line) for line in lines])


@dataclass
class Drawing:
    """A laid-out view: the SVG markup and the size it needs (pixels)."""

    svg: str
    width: float
    height: float
    boxes: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> top-left corner
    bands: dict[str, int] = field(default_factory=dict)  # node -> row of the wrapped layout (0 first)


BAND_GAP = 84  # between the rows of a wrapped layout (room for frames and the edges that turn back)


def _place(graph: Graph, aspect: float) -> tuple[dict[str, tuple[float, float]], dict[str, int], float]:
    """Top-left corner and band of every leaf, and the distance from one band's top to the next's.

    Columns by longest path; in a column each box goes next to its inputs (chains stay straight).
    A long network is wrapped like lines of text into bands of columns, as many as bring the
    picture closest to ``aspect`` (width / height), so a deep model reads on one screen.
    """
    layer = leaf_ranks(graph)
    preds: dict[str, list[str]] = {}
    for src, dst in graph.edges:
        preds.setdefault(dst, []).append(src)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    columns: dict[int, list[str]] = {}
    for name, col in layer.items():
        columns.setdefault(col, []).append(name)
    ys: dict[str, float] = {}
    step = BOX_H + GAP_Y
    for col in sorted(columns):
        wanted = []
        for name in columns[col]:
            # Next to the nearest inputs (the previous column's, usually): a block fed by the block before it
            # and by a mask computed far upstream stays in line with the block.
            inputs = [p for p in preds.get(name, []) if p in ys]
            nearest = max((layer[p] for p in inputs), default=0)
            near = [ys[p] for p in inputs if layer[p] == nearest]
            wanted.append((sum(near) / len(near) if near else 0.0, order[name], name))
        wanted.sort()
        floor = -math.inf
        for y, _, name in wanted:
            ys[name] = max(y, floor)
            floor = ys[name] + step
    top = min(ys.values(), default=0.0)
    tall = max(ys.values(), default=0.0) - top + BOX_H
    count = max(columns, default=0) + 1
    best = (math.inf, 1)
    for bands in range(1, count + 1):
        per = math.ceil(count / bands)
        shape = per * (BOX_W + GAP_X) / (bands * (tall + BAND_GAP))
        best = min(best, (abs(math.log(shape / aspect)), per))
    per, pitch = best[1], tall + BAND_GAP
    pos = {name: (float(PAD + (layer[name] % per) * (BOX_W + GAP_X)), BAND_TOP + (layer[name] // per) * pitch + y - top)
           for name, y in ys.items()}
    return pos, {name: layer[name] // per for name in ys}, pitch


def draw(graph: Graph, fills: Mapping[str, str] | None = None, *, containers: Sequence[str] = (),
         frames: Mapping[str, list[str]] | None = None, aspect: float = 2.2) -> Drawing:
    """Lay out ``graph``'s leaves left to right and draw them as SVG with ``data-node`` hooks for the page.

    Args:
        graph: :meth:`GraphView.visible`.
        fills: colour per node (others get their kind's plain fill).
        containers: boxes that stand for a collapsed module (drawn with a ``+`` and a bold border).
        frames: expanded module -> the visible boxes inside it; a labelled frame is drawn around them
            (one per band when the layout wraps).
        aspect: the width / height the picture should come close to (the page's canvas).
    """
    pos, band, pitch = _place(graph, aspect)
    fills = fills or {}
    width = max((x for x, _ in pos.values()), default=0.0) + BOX_W + PAD
    height = max((y for _, y in pos.values()), default=0.0) + BOX_H + PAD
    parts = ['<g class="sg-frames">']
    depth = {m: m.count(".") for m in (frames or {})}
    # A frame grows past the frames nested in it by one label's height each, so no two labels overlap.
    levels = {m: max((depth[o] - depth[m] for o in depth if o.startswith(m + ".")), default=0) for m in depth}
    for module, inside in sorted((frames or {}).items(), key=lambda kv: depth[kv[0]]):
        pieces: dict[int, list[tuple[float, float]]] = {}
        for n in inside:
            if n in pos:
                pieces.setdefault(band[n], []).append(pos[n])
        grow = 8 + 15 * levels[module]
        for i, corners in enumerate(pieces[b] for b in sorted(pieces)):
            x0, y0 = min(x for x, _ in corners) - grow, min(y for _, y in corners) - grow - 12
            x1, y1 = max(x for x, _ in corners) + BOX_W + grow, max(y for _, y in corners) + BOX_H + grow
            title = escape(module) + (" ▾" if i == 0 else " (cont.)")
            parts.append(f'<g class="sg-frame" data-frame="{escape(module)}"><rect x="{x0:.0f}" y="{y0:.0f}" '
                         f'width="{x1 - x0:.0f}" height="{y1 - y0:.0f}" rx="8"/>'
                         f'<text x="{x0 + 6:.0f}" y="{y0 + 12:.0f}">{title}</text></g>')
    parts.append('</g><g class="sg-edges">')
    for src, dst in graph.edges:
        if src in pos and dst in pos:
            wrap = BAND_TOP + band[dst] * pitch - BAND_GAP * 0.57 if band[src] != band[dst] else None
            parts.append(_edge(pos[src], pos[dst], wrap))
    parts.append('</g><g class="sg-nodes">')
    boxed = set(containers)
    for name, (x, y) in pos.items():
        node = graph[name]
        fill = fills.get(name) or _PLAIN.get(node.kind, "#ffffff")
        ink = "#ffffff" if name in fills and is_dark(fill) else "#1d2939"
        label = _short(node.name + (f" × {node.repeat}" if node.repeat > 1 else ""), 22)
        extra = ' data-box="1"' if name in boxed else ""
        plain = _PLAIN.get(node.kind, "#ffffff")
        parts.append(
            f'<g class="sg-node sg-{css_token(node.kind)}" data-node="{escape(name)}" data-plain="{plain}"{extra} '
            f'transform="translate({x:.0f},{y:.0f})">'
            f'<rect class="sg-rect" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}"/>'
            f'<text class="sg-name" x="8" y="16" fill="{ink}">{escape(label)}</text>'
            f'<text class="sg-sub" x="8" y="31" fill="{ink}">{escape(_subtitle(node))}</text>'
            + (f'<text class="sg-plus" x="{BOX_W - 14}" y="16" fill="{ink}">+</text>' if name in boxed else "")
            + f'<g class="sg-alert" visibility="hidden"><circle cx="{BOX_W}" cy="0" r="9"/>'
            f'<text x="{BOX_W}" y="4">!</text></g></g>')
    parts.append("</g>")
    body = "".join(parts)
    svg = (f'<svg class="sg-svg" width="100%" height="100%" data-width="{width:.0f}" data-height="{height:.0f}">'
           f'<g class="sg-viewport">{body}</g></svg>')
    return Drawing(svg, width, height, pos, band)


def _edge(a: tuple[float, float], b: tuple[float, float], gy: float | None) -> str:
    """An edge from box corner ``a``'s right side to ``b``'s left side (through the gap at ``gy`` to a later band)."""
    sx, sy, ex, ey = a[0] + BOX_W, a[1] + BOX_H / 2, b[0], b[1] + BOX_H / 2
    if gy is not None:  # to a later band: down into the gap above the target's band, back left, down into it
        return (f'<path class="sg-wrap" d="M{sx:.0f},{sy:.0f} C{sx + 30:.0f},{sy:.0f} {sx + 30:.0f},{gy:.0f} '
                f'{sx:.0f},{gy:.0f} L{ex:.0f},{gy:.0f} C{ex - 30:.0f},{gy:.0f} {ex - 30:.0f},{ey:.0f} '
                f'{ex:.0f},{ey:.0f}"/>')
    if ex - sx > BOX_W + GAP_X and abs(ey - sy) < BOX_H:
        # A skip connection along a row would hide behind the boxes it skips: arc over them.
        lift = min(sy, ey) - BOX_H * 1.1
        return (f'<path class="sg-skip" d="M{sx:.0f},{sy:.0f} C{sx + 40:.0f},{lift:.0f} {ex - 40:.0f},{lift:.0f} '
                f'{ex:.0f},{ey:.0f}"/>')
    mid = (sx + ex) / 2
    return f'<path d="M{sx:.0f},{sy:.0f} C{mid:.0f},{sy:.0f} {mid:.0f},{ey:.0f} {ex:.0f},{ey:.0f}"/>'


def _subtitle(node: Node) -> str:
    """Class, parameter count, then the output's feature shape when it fits the box."""
    shape = node.output_shapes[0][1:] if node.output_shapes and node.output_shapes[0] else []
    text = _short_end(node.op, 18) + (f" · {format_count(node.num_params)}p" if node.num_params else "")
    more = f" · {'×'.join(map(str, shape))}" if shape else ""
    return text + more if len(text + more) <= 27 else text


def _short_end(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"



def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]
