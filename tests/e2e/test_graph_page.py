"""The graph view in a real browser: ``sonde serve`` on a store holding a run's graph and metrics,
Debian's Chromium (Playwright) on ``/run/{name}/graph``.

The graph is extracted by ``sonde.graph`` from a small residual CNN; the Records are written so that
every layer's ``zero_frac`` grows over training (later layers faster), and one alert fires on
``blocks.2.act`` at step 20. The boxes must draw coloured, a click must expand a module into its
children, moving the slider must change the colours, the alert must ring its box only from
step 20 on, and a step written while the page is open must reach the slider. A screenshot is
kept in ``test-artifacts/graph.png`` (git-ignored).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sonde
from browser import ARTIFACTS, chromium, needs_chromium
from browser import wait as _wait
from nets import Block
from servers import SondeServe
from sonde.records import Record
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import open_store

RUN = "resnet-mini"
STEPS = 40

pytestmark = needs_chromium


def _seed(path: Path) -> None:
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    model.add_module("blocks", nn.Sequential(Block(16), Block(16), Block(16)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))
    graph = sonde.graph(model.eval(), torch.zeros(1, 3, 32, 32))
    layers = [n for n in graph.leaves() if n.kind == "module"]
    with open_store(path) as store:
        store.start_run(RunInfo(RUN, model="Sequential", framework="torch",
                                layers=[LayerInfo(n.name, n.op, n.params) for n in layers]))
        store.put_graph(RUN, graph.to_dict())
        records = []
        for step in range(STEPS):
            for i, node in enumerate(layers):
                growth = (i + 1) / len(layers)
                records.append(Record(RUN, step, "train", node.name, "activations", "zero_frac",
                                      0.05 + 0.9 * growth * step / (STEPS - 1)))
                records.append(Record(RUN, step, "train", node.name, "weights", "norm", 1.0 + 0.1 * i + 0.01 * step))
            records.append(Record(RUN, step, "train", "", "loss", "loss", 2.0 / (1 + step)))
        records.append(Record(RUN, 20, "train", "blocks.2.act", "activations", "alert", 1.0,
                              "layer 'blocks.2.act': 91% of its activations are exactly zero at step 20 (dead units)"))
        store.write(RUN, records)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "sonde.db"


@pytest.fixture
def server(tmp_path: Path, store_path: Path) -> Iterator[str]:
    _seed(store_path)
    with SondeServe.running(store_path, tmp_path / "server.log") as served:
        yield served.url


def _nodes(page: Any) -> dict[str, dict[str, Any]]:
    """Every drawn box: its fill, whether it is coloured by the metric, whether an alert rings it."""
    return page.evaluate(  # type: ignore[no-any-return]
        """() => Object.fromEntries([...document.querySelectorAll('#sonde-graph .sg-node')].map(g => {
            const fill = g.querySelector('.sg-rect').getAttribute('fill');
            return [g.dataset.node, {fill, coloured: fill !== g.dataset.plain,
                                     alert: g.classList.contains('sg-alerted')}];
        }))"""
    )


def test_graph_view_expands_modules_and_plays_through_training(server: str, store_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = chromium(pw)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        # The run page links to the graph view.
        page.goto(f"{server}/run/{RUN}")
        page.locator("[data-link=graph]").click()
        page.wait_for_url(f"**/run/{RUN}/graph")

        # A small model opens fully expanded, every layer coloured by activations · zero_frac at the last step.
        nodes = _wait(lambda: (n := _nodes(page)) and "blocks.0.conv1" in n and n, 30, "the graph to draw")
        assert sum(v["coloured"] for v in nodes.values()) >= 15
        assert not nodes["input"]["coloured"]
        assert page.locator("[data-sg=step]").inner_text() == f"step {STEPS - 1}"
        assert nodes["blocks.2.act"]["alert"] and not nodes["blocks.0.act"]["alert"]

        # Collapse everything, then click a module: its children appear (and it stops being one box).
        page.get_by_role("button", name="Collapse all").click()
        top = _wait(lambda: (n := _nodes(page)) and "blocks" in n and n, 10, "the collapsed view")
        assert set(top) == {"input", "stem", "blocks", "head", "output"}
        assert top["blocks"]["coloured"] and top["blocks"]["alert"]  # the alert shows on the enclosing box
        page.locator('#sonde-graph [data-node="blocks"]').click()
        expanded = _wait(lambda: (n := _nodes(page)) and "blocks.1" in n and n, 10, "blocks' children")
        assert {"blocks.0", "blocks.1", "blocks.2"} <= set(expanded) and "blocks" not in expanded
        assert expanded["blocks.2"]["alert"] and not expanded["blocks.0"]["alert"]

        # The wheel zooms around the pointer and a drag pans (the viewport's transform changes).
        def transform() -> str:
            return str(page.locator("#sonde-graph .sg-viewport").get_attribute("transform"))

        def scale(t: str) -> float:
            return float(t.split("scale(")[1].rstrip(")"))

        canvas = page.locator("#sonde-graph").bounding_box()
        assert canvas is not None
        fitted = transform()
        page.mouse.move(canvas["x"] + 200, canvas["y"] + 200)
        page.mouse.wheel(0, -300)
        zoomed = _wait(lambda: (t := transform()) != fitted and t, 5, "the wheel to zoom")
        assert scale(zoomed) > scale(fitted)
        page.mouse.down()
        page.mouse.move(canvas["x"] + 320, canvas["y"] + 260, steps=4)
        page.mouse.up()
        assert transform() != zoomed and scale(transform()) == scale(zoomed)
        page.get_by_role("button", name="Fit").click()
        _wait(lambda: transform() == fitted, 5, "Fit to restore the whole picture")

        # Hovering a box shows its shapes, parameters and metrics.
        page.locator('#sonde-graph [data-node="blocks.1"]').hover()
        tip = page.locator("#sonde-graph .sg-tip")
        _wait(lambda: tip.is_visible(), 5, "the hover card")
        text = tip.inner_text()
        assert "output [1, 16, 32, 32]" in text and "parameters" in text and "zero_frac at step 39" in text

        # The slider goes back to the first step: colours change, the alert (step 20) is not there yet.
        slider = page.locator("[data-sg=slider]")
        box = slider.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + 1, box["y"] + box["height"] / 2)
        _wait(lambda: page.locator("[data-sg=step]").inner_text() == "step 0", 10, "the slider at step 0")
        early = _wait(lambda: (n := _nodes(page)) and n["blocks.2"]["fill"] != expanded["blocks.2"]["fill"] and n,
                      10, "colours of step 0")
        assert not early["blocks.2"]["alert"]
        assert len({v["fill"] for v in early.values() if v["coloured"]}) <= 2  # everything starts alike

        # Play runs through training by itself.
        page.locator("[data-sg=play]").click()
        _wait(lambda: page.locator("[data-sg=step]").inner_text() not in ("step 0", "step 1"), 10, "playback")
        page.locator("[data-sg=play]").click()

        page.mouse.click(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2)
        _wait(lambda: page.locator("[data-sg=step]").inner_text() == f"step {STEPS - 1}", 10, "the last step")
        page.mouse.move(5, 5)
        page.locator('#sonde-graph [data-node="blocks.2"]').click()  # open the alerted block for the picture
        _wait(lambda: "blocks.2.conv1" in _nodes(page), 10, "blocks.2's children")
        page.mouse.move(5, 5)  # no hover card in the picture
        time.sleep(0.5)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "graph.png"
        page.screenshot(path=str(shot), full_page=True)
        # Live: the run goes on; with the slider at the newest step, the view follows without a reload.
        with open_store(store_path) as store:
            store.write(RUN, [Record(RUN, STEPS + 5, "train", str(name), "activations", "zero_frac", 0.5)
                              for name in store.layers(RUN)["name"]])
        _wait(lambda: page.locator("[data-sg=step]").inner_text() == f"step {STEPS + 5}", 15, "the new step")
        print(f"\nscreenshot: {shot}")
        assert not errors, errors
        browser.close()
