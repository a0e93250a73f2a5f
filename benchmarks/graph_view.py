"""Graph view: what the dashboard's first picture of a big model costs, beside drawing every node.

For ResNet-152 (``benchmarks/graph.py``'s definition) and GPT-2 (``transformers.GPT2Config()``, no
weights), built with ``sonde.graph``, it times in one process:

* **first view**: ``GraphView(stored_dict)`` (prune, choose what to collapse) + ``draw`` (layout and SVG)
  of the collapsed picture the page opens with;
* **all nodes**: the same layout and SVG with every module expanded (what a view without collapsing
  would have to lay out and ship);
* **per step**: the colours and hover cards of one slider step (``values`` + ``alerts`` + ``tooltip``),
  what the page computes at every frame of *play*;
* **browser**: when Debian's Chromium is installed, the page script's ``sondeGraph.show`` (insert the
  SVG, fit, colour) plus the browser's layout of it, for the first view and for every node;

and prints the ratios first view / all nodes. Run: ``python benchmarks/graph_view.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import sonde
from sonde.server.ui.graph_view import GraphView, draw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph import MODELS  # the model definitions of benchmarks/graph.py


def _best(fn: Callable[[], Any], rounds: int = 5) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


CHROMIUM = "/usr/bin/chromium"
_SHOW = """(svg) => { const t = performance.now(); sondeGraph.show('g', svg, {fills: {}, tips: {}}, false);
    document.querySelector('#g svg').getBBox(); document.body.offsetHeight; return performance.now() - t; }"""


def browser_times(svgs: list[str]) -> list[float] | None:
    """Median milliseconds of showing each SVG in Chromium (None without Chromium)."""
    if not Path(CHROMIUM).exists():
        return None
    from playwright.sync_api import sync_playwright

    from sonde.server.ui.graph_script import GRAPH_HEAD

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_content(f"<html><head>{GRAPH_HEAD}<script>function emitEvent() {{}}</script></head><body>"
                         "<div id='g' class='sg-root'><div class='sg-canvas'></div><div class='sg-tip'></div></div>"
                         "</body></html>")
        out = [statistics.median(page.evaluate(_SHOW, svg) for _ in range(5)) for svg in svgs]
        browser.close()
    return out


def measure(name: str) -> str:
    """One model's row of the table."""
    model, args = MODELS[name]()
    stored = sonde.graph(model.eval(), args).to_dict()

    def first() -> tuple[GraphView, Any]:
        view = GraphView(stored)
        return view, draw(view.visible(), containers=sorted(view.collapsed), frames=view.frames())

    def everything() -> Any:
        view = GraphView(stored)
        view.expand_all()
        return draw(view.visible(), frames=view.frames())

    t_first, (view, drawing) = _best(first)
    t_all, full = _best(everything)
    layers = [n.name for n in view.graph.leaves() if n.kind == "module"]
    heatmap = {"layers": layers, "steps": list(range(400)),
               "values": np.random.default_rng(0).random((len(layers), 400)).tolist()}
    alerts = [{"step": 10, "layer": layers[len(layers) // 2], "message": "dead units"}]

    def one_step() -> int:
        values = view.values(heatmap, 200)
        marks = view.alerts(alerts, upto=200)
        tips = {n.name: view.tooltip(n.name, [f"{values.get(n.name, 0.0):.3g}", *marks.get(n.name, [])])
                for n in view.visible().leaves()}
        return len(tips)

    t_step, _ = _best(one_step)
    shown = browser_times([drawing.svg, full.svg])
    browser = (f"{shown[0]:>13.1f}ms {shown[1]:>8.1f}ms {shown[0] / shown[1]:>6.2f}" if shown
               else f"  (no Chromium at {CHROMIUM})")
    return (f"{name:<10} {len(view.graph.nodes):>6} {len(view.visible().leaves()):>6} {t_first * 1e3:>9.1f}ms "
            f"{len(drawing.svg) / 1024:>5.0f}kB {t_all * 1e3:>8.1f}ms {len(full.svg) / 1024:>5.0f}kB "
            f"{t_first / t_all:>6.2f} {t_step * 1e3:>7.1f}ms {browser}")


def main() -> None:
    print(f"{'model':<10} {'nodes':>6} {'shown':>6} {'first view':>11} {'svg':>7} {'all nodes':>10} {'svg':>7} "
          f"{'ratio':>6} {'per step':>9} {'browser first':>15} {'all':>10} {'ratio':>6}")
    for name in ("resnet152", "gpt2"):
        print(measure(name), flush=True)


if __name__ == "__main__":
    main()
