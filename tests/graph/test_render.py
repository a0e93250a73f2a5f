"""Pictures of a graph: the readable view's size bound, the SVG's layering and colours, the text tree."""

from __future__ import annotations

import re

import torch
from torch import nn

import sonde
from sonde.graph.render import format_tree, readable_view, to_svg


def _deep_model() -> nn.Module:
    def block() -> nn.Sequential:
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())

    return nn.Sequential(nn.Linear(4, 8), *[block() for _ in range(30)], nn.Linear(8, 2))


def test_readable_view_respects_the_box_budget() -> None:
    g = sonde.graph(_deep_model(), torch.zeros(1, 4))
    assert len(g.leaves()) > 120
    view = readable_view(g, max_nodes=40)
    assert len(view.leaves()) <= 40
    # 30 identical blocks fold into one box
    assert max(n.repeat for n in view.nodes) == 30


def test_svg_layers_follow_the_edges_and_colour_by_value() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    g = sonde.graph(model, torch.zeros(1, 4))
    svg = to_svg(g, {"0": 1.0, "2": 5.0})
    boxes = dict(re.findall(r'<title>(\S+) [^<]*</title><rect x="(\d+)"', svg))
    for src, dst in g.edges:
        assert int(boxes[src]) < int(boxes[dst])  # left to right along every edge
    fills = dict(re.findall(r'<title>(\S+) [^<]*</title><rect [^>]*fill="(#[0-9a-f]{6})"', svg))
    assert fills["0"] == "#440154" and fills["2"] == "#fde725"  # low end and high end of the ramp
    assert 'xmlns="http://www.w3.org/2000/svg"' in svg and "xmlns" not in to_svg(g, standalone=False)


def test_format_tree_lists_every_node_with_its_shape() -> None:
    g = sonde.graph(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.zeros(3, 4))
    lines = format_tree(g).splitlines()
    assert lines[0] == "Sequential: 4 nodes, 3 edges, 40 parameters (traced on meta)"
    assert lines[2].split() == ["0", "Linear", "[3,", "8]", "40"]
