"""Store-derived strings in the dashboard's markup are escaped: the heatmap and CKA tooltip formatters,
the graph's SVG (node kinds, names, frames) and its hover cards. Each string here is a script
injection; the markup must carry it as text only. The same pages in Chromium, hovered, are in
``tests/e2e/test_security_browser.py``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from sonde.graph.model import Graph, Node
from sonde.server.ui.charts import heatmap_options
from sonde.server.ui.graph_view import GraphView, draw
from sonde.server.ui.markup import css_token, escape, js_texts
from sonde.server.ui.similarity import matrix_options

ATTACKS = ["<img src=x onerror=window.__pwned=1>", '"><svg onload=window.__pwned=1>', "'\";alert(1)//",
           "`${alert(1)}`", "</script><script>alert(1)</script>"]
RAW = ("<img", "<svg", "<script", "</script")


def _no_raw_markup(text: str) -> None:
    for raw in RAW:
        assert raw not in text, (raw, text[:300])


def test_escape_and_js_texts_leave_no_markup() -> None:
    for attack in ATTACKS:
        _no_raw_markup(escape(attack))
        assert '"' not in escape(attack) and "'" not in escape(attack)
    _no_raw_markup(js_texts(ATTACKS))
    assert css_token('module" onmouseover="x') == "module-onmouseover-x"


def test_the_heatmap_tooltip_carries_layer_names_escaped() -> None:
    layers = [f"layer{i}{a}" for i, a in enumerate(ATTACKS)]
    labels = {layer: f"{layer} · {ATTACKS[0]}" for layer in layers}
    opts = heatmap_options({"layers": layers, "steps": [0, 1], "values": [[0.5, 0.25]] * len(layers)},
                           title="t", labels=labels)
    formatter = opts["tooltip"][":formatter"]
    _no_raw_markup(formatter)
    assert "&lt;img src=x onerror=window.__pwned=1&gt;" in formatter
    # The axis labels are drawn on the canvas as text: they keep the real names.
    assert opts["yAxis"]["data"][0] == labels[layers[0]]


def test_the_cka_tooltip_carries_layer_names_escaped() -> None:
    labels = {ATTACKS[0]: ATTACKS[0] + " · <b>Linear</b>"}
    opts = matrix_options({"layers": ATTACKS, "values": [[1.0] * len(ATTACKS)] * len(ATTACKS), "step": 3},
                          labels=labels)
    formatter = opts["tooltip"][":formatter"]
    _no_raw_markup(formatter)
    names = js_texts([labels.get(a, a) for a in ATTACKS])
    assert f"const L = {names};" in formatter and "<" not in names and "&lt;b&gt;Linear&lt;/b&gt;" in names


def _attack_graph() -> Graph:
    """Every string of a graph an attack, built as objects: this is what a graph that skipped validation draws."""
    frame = ATTACKS[1]
    nodes = [Node(ATTACKS[0], "input", ATTACKS[2]),
             Node(frame, "module", ATTACKS[3]),
             Node(frame + ".0", 'module" onmouseover="window.__pwned=1', ATTACKS[4], frame,
                  output_shapes=[[1, 2]], params={ATTACKS[0]: [2, 2]}, num_params=4),
             Node(frame + ".1", "function", ATTACKS[0], frame),
             Node("output", "output", ATTACKS[1])]
    return Graph(nodes, [(ATTACKS[0], frame + ".0"), (frame + ".0", frame + ".1"), (frame + ".1", "output")],
                 model=ATTACKS[0])


def test_the_graph_svg_carries_names_kinds_and_ops_as_text() -> None:
    graph = _attack_graph()
    drawing = draw(graph, frames={ATTACKS[1]: [ATTACKS[1] + ".0", ATTACKS[1] + ".1"]},
                   containers=[ATTACKS[1] + ".0"])
    root = ET.fromstring(drawing.svg)  # well-formed: no attribute or element was broken out of
    tags = {el.tag for el in root.iter()}
    assert tags <= {"svg", "g", "rect", "text", "path", "circle"}, tags
    for el in root.iter():
        assert not [a for a in el.attrib if a.lower().startswith("on")], el.attrib
        if el.get("class", "").startswith("sg-node"):
            assert all(c.startswith("sg-") for c in el.get("class", "").split()), el.get("class")
    assert {el.get("data-node") for el in root.iter() if el.get("data-node")} == {n.name for n in graph.nodes
                                                                                  if n.name != ATTACKS[1]}
    texts = " ".join(el.text or "" for el in root.iter())
    assert "…" in texts or ATTACKS[1] in texts  # names are shown (shortened), as text


def test_the_graph_hover_card_escapes_every_field() -> None:
    graph = _attack_graph()
    view = GraphView(graph, max_nodes=100)
    view.expand_all()
    for node in graph.nodes:
        card = view.tooltip(node.name, ["<b>kept</b>"])  # lines are the page's own, already escaped markup
        _no_raw_markup(card)
        assert card.endswith("<b>kept</b>")
