"""End to end in a real browser: ``sonde serve`` in one process, probed training in another,
Debian's Chromium (Playwright) on the dashboard.

The run must appear on the runs page, its overview heatmap and a per-layer chart must draw
data, and both must grow while training goes on, without a reload. A screenshot is kept in
``test-artifacts/dashboard.png`` (git-ignored) and its path printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import ARTIFACTS, chromium, needs_chromium
from browser import wait as _wait
from servers import SondeServe

RUN = "e2e-mlp"

pytestmark = needs_chromium

# Trains a small MLP with every probe on, reporting to the server (server=, as a remote training
# job would), a little slowly so that the browser sees it grow, until the stop file appears.
TRAINER = """
import sys, time, pathlib, torch
from torch import nn
import sonde
server, stop = sys.argv[1], pathlib.Path(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = torch.randn(512, 16), torch.randint(0, 4, (512,))
with sonde.probe(model, run=sys.argv[3], server=server, optimizer=opt) as p:
    for step in range(600):
        i = (step * 32) % 512
        out = model(x[i:i + 32]); loss = nn.functional.cross_entropy(out, y[i:i + 32])
        loss.backward(); opt.step(); opt.zero_grad()
        p.log(loss=loss, labels=y[i:i + 32], outputs=out)
        print("step", step, flush=True)
        if stop.exists():
            break
        time.sleep(0.08)
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    store = tmp_path / "sonde.db"
    with SondeServe.running(store, tmp_path / "server.log") as served:
        yield served.url, store


def _chart(page: Any, name: str) -> dict[str, Any]:
    """The options ECharts is drawing right now for the chart ``data-chart=<name>``."""
    return page.evaluate(  # type: ignore[no-any-return]
        """(name) => {
            const el = document.querySelector(`[data-chart="${name}"]`);
            if (!el) return null;
            const chart = getElement(el).chart;
            if (!chart) return null;
            const o = chart.getOption();
            return {x: o.xAxis[0].data || null, series: o.series.map(s => ({name: s.name, n: (s.data || []).length,
                    last: (s.data || []).length ? s.data[s.data.length - 1] : null}))};
        }""",
        name,
    )


def test_dashboard_shows_a_training_run_live(server: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, store = server
    stop = tmp_path / "stop"
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, url, str(stop), RUN],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with sync_playwright() as pw:
            browser = chromium(pw)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Runs page: the run appears by itself (the page was open before it existed).
            page.goto(url + "/")
            link = page.locator("a[data-run-link]", has_text=RUN)
            link.wait_for(timeout=30_000)
            row = page.locator("tr", has=link)
            first_steps = int(_wait(lambda: row.locator("td").nth(5).inner_text().strip(), 10, "steps cell"))
            _wait(lambda: int(row.locator("td").nth(5).inner_text().strip()) > first_steps, 15,
                  "the runs page to count more steps without a reload")

            # Run page: heatmap and per-layer lines draw data.
            link.click()
            page.wait_for_url(f"**/run/{RUN}")
            heat = _wait(lambda: (c := _chart(page, "heatmap")) and c["series"][0]["n"] > 0 and c, 30, "heatmap data")
            assert heat["series"][0]["name"] == "activations · zero_frac"
            lines = _wait(lambda: (c := _chart(page, "lines")) and any(s["n"] > 0 for s in c["series"]) and c, 30,
                          "per-layer line data")
            assert {s["name"] for s in lines["series"]} >= {"1 · ReLU", "3 · ReLU"}
            steps_before = int(page.locator("[data-stat=steps]").inner_text())

            # Live: without a reload, the heatmap gains step columns and the lines gain points.
            page_url = page.url
            grown = _wait(lambda: (c := _chart(page, "heatmap")) and int(c["x"][-1]) > int(heat["x"][-1]) and c, 20,
                          "the heatmap to gain steps while training runs")
            more = _wait(lambda: (c := _chart(page, "lines")) and max(s["n"] for s in c["series"])
                         > max(s["n"] for s in lines["series"]) and c, 20, "the line chart to gain points")
            _wait(lambda: int(page.locator("[data-stat=steps]").inner_text()) > steps_before, 20,
                  "the step count in the header to move")
            assert page.url == page_url
            assert int(grown["x"][-1]) > int(heat["x"][-1]) and more

            # Zooming into a range of steps asks the server for that range in detail.
            page.evaluate("""() => getElement(document.querySelector('[data-chart="lines"]')).chart
                                   .dispatchAction({type: 'dataZoom', start: 50, end: 100})""")
            _wait(lambda: "in detail" in page.locator("[data-caption=lines]").inner_text(), 15,
                  "the zoomed line chart to load its window")
            # The overview heatmap too: zoomed to its newer half, it re-queries that range, keeps the
            # whole run's columns outside it, and the view stays on the zoomed steps.
            page.evaluate("""() => getElement(document.querySelector('[data-chart="heatmap"]')).chart
                                   .dispatchAction({type: 'dataZoom', start: 50, end: 100})""")
            caption = _wait(lambda: (t := page.locator("[data-caption=heatmap]").inner_text()) and "in detail" in t
                            and t, 15, "the zoomed heatmap to load its window")
            first = int(caption.split("steps ")[1].split("–")[0].replace(",", ""))
            pinned = """() => { const el = document.querySelector('[data-chart="heatmap"]');
                                const o = getElement(el).chart.getOption();
                                return {x: o.xAxis[0].data, at: o.dataZoom[0].startValue}; }"""
            zoomed = _wait(lambda: (z := page.evaluate(pinned)) and isinstance(z["at"], int)
                           and int(z["x"][z["at"]]) == first and z, 15, "the heatmap's zoom to stay on its window")
            assert zoomed["x"][0] == "0"

            hist = _wait(lambda: (c := _chart(page, "histogram-left")) and c["series"][0]["n"] > 0 and c, 20,
                         "the weights histogram over time")
            assert len(hist["x"]) >= 2

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)

            # Comparison: the run's loss in the overlay chart.
            page.goto(f"{url}/compare?runs={RUN}")
            compared = _wait(lambda: (c := _chart(page, "compare")) and c["series"][0]["n"] > 0 and c, 30,
                             "the comparison chart")
            assert compared["series"][0]["name"] == RUN

            print(f"\nscreenshot: {shot}")
            assert not errors, errors
            browser.close()
    finally:
        stop.touch()
        try:
            trainer.wait(30)
        except subprocess.TimeoutExpired:
            trainer.kill()
    output = trainer.stdout.read() if trainer.stdout else ""
    assert trainer.returncode == 0, output[-3000:]
    assert os.path.exists(store)
