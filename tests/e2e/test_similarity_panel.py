"""The run page's layer × layer CKA panel in a real browser: ``sonde serve`` on a store filled by
training a small MLP with ``metrics=["zero_frac", CKAMatrix(compute_every=4)]`` and a probe set,
Debian's Chromium (Playwright) on ``/run/{name}``.

The panel must draw the matrix of the latest step in forward order, cell for cell what the
Records say; a step written while the page is open must appear (the slider follows it); moving
the slider to the first step must show that step's matrix. A run without the matrix must not
show the panel. A screenshot is kept in ``test-artifacts/similarity.png`` (git-ignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from browser import ARTIFACTS, chromium, needs_chromium
from browser import wait as _wait
from servers import SondeServe
from sonde.metrics import CKAMatrix
from sonde.records import Record
from sonde.store import open_store

RUN = "mlp-cka"
PLAIN = "mlp-plain"
STEPS = 9  # the matrix at steps 0, 4 and 8
LAYERS = ["0", "1", "2", "3", "4", "5", "6"]

pytestmark = needs_chromium


def _train(path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    probe_x = torch.randn(96, 10)
    with sonde.probe(model, run=RUN, store=str(path), optimizer=opt,
                     metrics=["zero_frac", CKAMatrix(compute_every=4)], probe_set=probe_x) as p:
        for step in range(STEPS):
            i = (step * 32) % 256
            out = model(x[i:i + 32])
            loss = nn.functional.cross_entropy(out, y[i:i + 32])
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
    plain = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    with sonde.probe(plain, run=PLAIN, store=str(path), optimizer=opt, metrics=["zero_frac"]):
        for _ in range(2):
            plain(torch.randn(3, 4))
            opt.step()


def _matrix(path: Path, step: int) -> np.ndarray:
    """The matrix at ``step`` assembled here from the stored Records (rows a, columns b, forward order)."""
    with open_store(path) as store:
        frame = store.load(RUN, topics="activations")
    frame = frame[(frame["step"] == step) & frame["metric"].str.startswith("cka_matrix:")]
    out = np.full((len(LAYERS), len(LAYERS)), np.nan)
    for layer, metric, value in zip(frame["layer"], frame["metric"], frame["value"], strict=True):
        out[LAYERS.index(layer), LAYERS.index(metric.split(":", 1)[1])] = value
    return out


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "sonde.db"
    _train(path)
    return path


@pytest.fixture
def server(tmp_path: Path, store_path: Path) -> Iterator[str]:
    with SondeServe.running(store_path, tmp_path / "server.log") as served:
        yield served.url


def _shown(page: Any) -> dict[str, Any] | None:
    """What the similarity chart draws right now: title, axis names and the cells as a matrix."""
    return page.evaluate(  # type: ignore[no-any-return]
        """() => {
            const el = document.querySelector('[data-chart="similarity"]');
            if (!el) return null;
            const chart = getElement(el).chart;
            if (!chart) return null;
            const o = chart.getOption();
            const n = o.yAxis[0].data.length;
            const m = Array.from({length: n}, () => Array(n).fill(-1));
            for (const [x, y, v] of o.series[0].data) m[y][x] = v;
            for (const [x, y] of o.series[1].data) m[y][x] = null;
            return {title: o.title[0].text, rows: o.yAxis[0].data, cols: o.xAxis[0].data, m};
        }"""
    )


def _as_array(m: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)


def test_similarity_panel_draws_the_cka_matrix_live(server: str, store_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = chromium(pw)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        # A run without the matrix: the panel stays hidden while the rest of the page draws.
        page.goto(f"{server}/run/{PLAIN}")
        _wait(lambda: page.locator('[data-chart="heatmap"]').count(), 30, "the plain run's overview heatmap")
        assert not page.locator("[data-view=similarity]").is_visible()

        # The run with the matrix: the latest step (8), forward order, the stored values cell for cell.
        page.goto(f"{server}/run/{RUN}")
        panel = page.locator("[data-view=similarity]")
        shown = _wait(lambda: (s := _shown(page)) and s, 30, "the CKA matrix to draw")
        assert panel.is_visible()
        assert shown["title"] == "CKA · step 8"
        assert [r.split(" · ")[0] for r in shown["rows"]] == LAYERS and shown["cols"] == shown["rows"]
        assert "1 · ReLU" in shown["rows"]
        expected = _matrix(store_path, 8)
        np.testing.assert_allclose(_as_array(shown["m"]), expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.diag(expected), 1.0, rtol=1e-9)
        assert expected.min() < 0.9  # the layers do differ: a real matrix, not all ones
        assert page.locator("[data-similarity=step]").inner_text().startswith("step 8 (latest) · 3 computed")
        ARTIFACTS.mkdir(exist_ok=True)
        panel.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        panel.screenshot(path=str(ARTIFACTS / "similarity.png"))
        print(f"\nscreenshot: {ARTIFACTS / 'similarity.png'}")

        # A step written while the page is open appears, and the panel (following the latest) shows it.
        new = np.full((len(LAYERS), len(LAYERS)), 0.25)
        np.fill_diagonal(new, 1.0)
        new[2, 5] = 0.75
        with open_store(store_path) as store:
            store.write(RUN, [Record(RUN, 12, "train", a, "activations", f"cka_matrix:{b}", float(new[i, j]))
                              for i, a in enumerate(LAYERS) for j, b in enumerate(LAYERS)])
        live = _wait(lambda: (s := _shown(page)) and s["title"] == "CKA · step 12" and s, 15, "the new step")
        np.testing.assert_allclose(_as_array(live["m"]), new, rtol=1e-6)
        _wait(lambda: page.locator("[data-similarity=step]").inner_text().startswith("step 12 (latest) · 4"),
              5, "the step label to count the new step")

        # The slider back to the first step: step 0's matrix.
        box = page.locator("[data-similarity=slider]").bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + 2, box["y"] + box["height"] / 2)
        first = _wait(lambda: (s := _shown(page)) and s["title"] == "CKA · step 0" and s, 10, "step 0")
        np.testing.assert_allclose(_as_array(first["m"]), _matrix(store_path, 0), rtol=1e-4, atol=1e-6)
        assert page.locator("[data-similarity=step]").inner_text().startswith("step 0 ·")
        assert not errors, errors
        browser.close()
