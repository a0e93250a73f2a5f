"""The graph view's model: collapse and expand, colours from heatmap rows, alerts on their boxes, layout.

The graph comes from ``sonde.graph`` on a small residual CNN; expected values are computed here
with numpy from the heatmap grid, never through the view's own code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from nets import Block
from sonde.graph.model import Graph
from sonde.server.ui.graph_view import BOX_H, BOX_W, GraphView, base_name, draw, ramp


def cnn() -> nn.Module:
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    model.add_module("blocks", nn.Sequential(Block(8), Block(8)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    return model.eval()


@pytest.fixture(scope="module")
def graph() -> Graph:
    return sonde.graph(cnn(), torch.zeros(2, 3, 8, 8))


def boxes(view: GraphView) -> set[str]:
    return {n.name for n in view.visible().leaves()}


def test_small_model_starts_fully_expanded_and_collapses_to_top_level(graph: Graph) -> None:
    view = GraphView(graph)
    assert {"blocks.0.conv1", "blocks.1.bn2", "stem.0", "head.2"} <= boxes(view)
    assert view.collapsed == set()
    view.collapse_all()
    assert boxes(view) == {"input", "stem", "blocks", "head", "output"}
    view.expand_all()
    assert boxes(view) == {n.name for n in graph.prune().leaves()}
    view.collapse_all()
    # Boxes are joined in tensor order: input -> stem -> blocks -> head -> output.
    assert set(view.visible().edges) == {("input", "stem"), ("stem", "blocks"), ("blocks", "head"), ("head", "output")}


def test_click_expands_one_level_then_collapses_the_enclosing_module(graph: Graph) -> None:
    view = GraphView(graph)
    view.collapse_all()
    assert view.toggle("blocks") == "expanded"
    assert {"blocks.0", "blocks.1"} <= boxes(view) and "blocks" not in boxes(view)
    assert not any(name.startswith("blocks.0.") for name in boxes(view))  # children stay collapsed
    assert view.toggle("blocks.0") == "expanded"
    assert {"blocks.0.conv1", "blocks.0.act", "blocks.0.act:2", "blocks.1"} <= boxes(view)
    assert view.frames()["blocks.0"] and set(view.frames()["blocks"]) >= set(view.frames()["blocks.0"])
    assert view.toggle("blocks.0.conv2") == "collapsed"  # a click inside closes blocks.0
    assert "blocks.0" in boxes(view) and "blocks.0.conv2" not in boxes(view)
    view.collapse("blocks")  # the frame's label
    assert "blocks" in boxes(view) and view.collapsed >= {"blocks"}
    assert not any(c.startswith("blocks.") for c in view.collapsed)
    assert view.toggle("input") == ""  # top-level non-module: nothing to do


def test_bad_names_are_refused_with_the_names_that_exist(graph: Graph) -> None:
    view = GraphView(graph)
    with pytest.raises(ValueError, match="no node 'blocks.9'.*names look like"):
        view.toggle("blocks.9")
    with pytest.raises(ValueError, match="'blocks.0.conv1' has no nodes inside"):
        view.collapse("blocks.0.conv1")
    with pytest.raises(ValueError, match="how= expects 'mean' or 'max', got 'median'"):
        view.values({"layers": [], "values": []}, 0, how="median")


def test_colours_of_collapsed_boxes_are_mean_or_max_of_their_leaf_rows(graph: Graph) -> None:
    view = GraphView(graph)
    leaves = [n.name for n in graph.leaves() if n.kind == "module"]
    rng = np.random.default_rng(1)
    grid = rng.random((len(leaves), 5))
    grid[leaves.index("blocks.0.bn1"), 2] = np.nan  # a NaN cell is skipped, not averaged
    heatmap = {"layers": leaves, "steps": [0, 10, 20, 30, 40],
               "values": [[None if np.isnan(v) else float(v) for v in row] for row in grid]}
    view.collapse_all()
    view.toggle("blocks")  # blocks.0 and blocks.1 are boxes; stem and head too
    for how, reduce in (("mean", np.nanmean), ("max", np.nanmax)):
        values = view.values(heatmap, 2, how)
        for box in ("blocks.0", "blocks.1", "stem", "head"):
            rows = [i for i, name in enumerate(leaves) if name.startswith(box + ".")]
            assert values[box] == pytest.approx(float(reduce(grid[rows, 2])))
    # An expanded leaf takes its own row; a second call (act:2) its own row as the probe names it.
    view.toggle("blocks.0")
    values = view.values(heatmap, 4)
    assert values["blocks.0.conv1"] == pytest.approx(grid[leaves.index("blocks.0.conv1"), 4])
    assert values["blocks.0.act:2"] == pytest.approx(grid[leaves.index("blocks.0.act:2"), 4])
    # A probe that named only the module (no call number) colours every call of it.
    only_act = {"layers": ["blocks.0.act"], "steps": [0], "values": [[0.25]]}
    assert view.values(only_act, 0) == {"blocks.0.act": 0.25, "blocks.0.act:2": 0.25}
    assert base_name("blocks.0.act:2") == "blocks.0.act" and base_name("a:b") == "a:b"


def test_alerts_land_on_the_box_that_shows_their_layer(graph: Graph) -> None:
    view = GraphView(graph)
    alerts = [{"step": 30, "layer": "blocks.1.conv2", "topic": "weight_updates", "message": "ratio too high"},
              {"step": 5, "layer": "stem.2", "topic": "activations", "message": "dead units"},
              {"step": 7, "layer": "not.in.graph", "topic": "activations", "message": "x"}]
    assert view.alerts(alerts) == {"blocks.1.conv2": ["step 30: ratio too high"], "stem.2": ["step 5: dead units"]}
    view.collapse_all()
    assert view.alerts(alerts) == {"blocks": ["step 30: ratio too high"], "stem": ["step 5: dead units"]}
    assert view.alerts(alerts, upto=10) == {"stem": ["step 5: dead units"]}


def test_ramp_is_viridis_linear_or_by_orders_of_magnitude() -> None:
    assert ramp(0.0, 0.0, 2.0) == "#440154" and ramp(2.0, 0.0, 2.0) == "#fde725"
    assert ramp(1.0, 0.0, 2.0) == "#21918c"  # the middle stop
    assert ramp(10.0, 1.0, 100.0, log=True) == ramp(1.0, 0.0, 2.0)
    assert ramp(float("nan"), 0.0, 1.0) is None and ramp(None, 0.0, 1.0) is None


def test_drawing_is_layered_left_to_right_without_overlaps(graph: Graph) -> None:
    view = GraphView(graph)
    visible = view.visible()
    drawing = draw(visible, {"stem.0": "#440154"}, frames=view.frames())
    assert max(drawing.bands.values()) >= 1  # 20 columns wrap into bands (a wide canvas: about 2.2 : 1)
    assert 1.2 < drawing.width / drawing.height < 4.0
    for src, dst in visible.edges:  # edges run forward in reading order: right, or on to a later band
        a, b = drawing.bands[src], drawing.bands[dst]
        assert b > a or (b == a and drawing.boxes[dst][0] > drawing.boxes[src][0]), (src, dst)
    one_row = draw(visible, aspect=100.0)
    assert set(one_row.bands.values()) == {0}
    for src, dst in visible.edges:
        assert one_row.boxes[dst][0] > one_row.boxes[src][0], (src, dst)
    corners = list(drawing.boxes.values())
    for i, (x1, y1) in enumerate(corners):
        for x2, y2 in corners[i + 1:]:
            assert abs(x1 - x2) >= BOX_W or abs(y1 - y2) >= BOX_H
    drawn = set(re.findall(r'data-node="([^"]+)"', drawing.svg))
    assert drawn == {n.name for n in visible.leaves()}
    assert set(re.findall(r'data-frame="([^"]+)"', drawing.svg)) == {"stem", "blocks", "blocks.0", "blocks.1", "head"}
    assert "(cont.)" in drawing.svg  # a module split over two bands is framed in both
    assert 'fill="#440154"' in drawing.svg


def test_resnet152_first_view_is_small_and_covers_every_node() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from graph import MODELS  # benchmarks/graph.py: the ResNet-152 definition

    model, args = MODELS["resnet152"]()
    g = sonde.graph(model.eval(), args)
    view = GraphView(g.to_dict())
    shown = boxes(view)
    assert 20 <= len(shown) <= 80
    assert all(view.owner(n.name) in shown for n in view.graph.leaves())
    assert "layer3.35" in shown  # one box per bottleneck block
    view.expand("layer3.35")
    assert "layer3.35.conv3" in boxes(view)
