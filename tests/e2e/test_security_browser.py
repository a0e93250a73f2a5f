"""The dashboard under attack, in Debian's Chromium (Playwright): script injection through every
string the store holds, cross-site writes from a page of another origin, and ``?token=`` links.

Runs, layers, layer types, topics, metrics, alert messages and a graph are created through the
REST API (as any local process may) with every string a script-injection attempt. Every page is
opened (runs, run, graph, compare, and the login page of a server with a token), the charts'
tooltips and the graph's hover cards are made to render, and the test fails on any dialog, on
``window.__pwned`` being set, or on an injected element in the DOM. A page served from another
origin then tries to write Records into the server without a token (a no-cors ``text/plain``
fetch, an ``application/x-msgpack`` fetch, an untyped body, a bodiless finish): nothing may be
stored. Finally a ``?token=`` link must open the whole page (websocket included) and leave the
address without the token.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgpack
import pytest

from browser import chromium, needs_chromium
from browser import wait as _wait
from servers import SondeServe, free_port, serving
from sonde.server.app import create_app

pytestmark = needs_chromium

PWN = "window.__pwned=1"
ATTACKS = [
    f"<img src=x onerror={PWN}>",
    f'"><svg onload={PWN}>',
    "'\";alert(1);'",
    f"</script><script>{PWN}</script>",
    f"<b onmouseover={PWN}>bold</b>",
    "${alert(1)}`+alert(1)+`",
]
RUN = ATTACKS[0]  # a run name is one URL path segment: no '/'
OTHER = ATTACKS[1]
LAYERS = ATTACKS  # layer names may hold anything
TYPES = [ATTACKS[(i + 2) % len(ATTACKS)] for i in range(len(ATTACKS))]
BOX = f'box"><img src=x onerror={PWN}>'  # a module around the last two layers in the graph
TOKEN = "t0ken-for-the-link"
STEPS = 6

# What an attacker's page does: writes the server must refuse. Results say only what the browser
# saw (a no-cors answer is opaque); the server's store is checked afterwards.
ATTACK_JS = """async ([server, run, bytes]) => {
    const body = new Uint8Array(bytes), url = `${server}/api/v1/runs/${encodeURIComponent(run)}`, out = {};
    const attempt = async (name, fn) => { try { const r = await fn(); out[name] = r.type + ' ' + r.status; }
                                          catch (e) { out[name] = 'blocked: ' + e.message; } };
    await attempt('no-cors text/plain', () => fetch(url + '/records', {method: 'POST', mode: 'no-cors',
        headers: {'Content-Type': 'text/plain'}, body}));
    await attempt('no-cors untyped', () => fetch(url + '/records', {method: 'POST', mode: 'no-cors',
        body: new Blob([body])}));
    await attempt('cors x-msgpack', () => fetch(url + '/records', {method: 'POST',
        headers: {'Content-Type': 'application/x-msgpack'}, body}));
    await attempt('no-cors finish', () => fetch(url + '/finish', {method: 'POST', mode: 'no-cors'}));
    await attempt('no-cors new run', () => fetch(`${server}/api/v1/runs`, {method: 'POST', mode: 'no-cors',
        headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({name: 'planted'})}));
    return out;
}"""

# Anything an injection would have left behind.
INJECTED_JS = """() => ({
    pwned: window.__pwned === 1,
    injected: [...document.querySelectorAll('*')].filter(el =>
            (el.tagName === 'IMG' && el.getAttribute('src') === 'x')
            || [...el.attributes].some(a => a.name.startsWith('on') && a.value.includes('__pwned'))
            || (el.tagName === 'SCRIPT' && el.text.trim() === 'window.__pwned=1'))
        .map(el => el.outerHTML.slice(0, 200)),
})"""

# Make a chart render its tooltip for data item ``index`` of series 0; returns the chart's text then.
TIP_JS = """async ([name, index]) => {
    const el = document.querySelector(`[data-chart="${name}"]`);
    const chart = el && getElement(el).chart;
    if (!chart || !chart.getOption().series[0].data.length) return null;
    chart.dispatchAction({type: 'showTip', seriesIndex: 0, dataIndex: index});
    await new Promise(r => setTimeout(r, 150));
    return el.innerText;
}"""


def _rows(run: str) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for step in range(STEPS):
        rows.append([step, "train", "", "loss", "loss", 2.0 / (1 + step)])
        for i, layer in enumerate(LAYERS):
            rows.append([step, "train", layer, "activations", "zero_frac", 0.1 * i + 0.01 * step])
            rows.append([step, "train", layer, "weights", "norm", 1.0 + i + 0.1 * step])
            rows.append([step, "train", layer, "weights", "histogram", [float(i), 2.0, 3.0, 1.0]])
            rows.append([step, "train", layer, "weights", "histogram_edges", [-1.0, -0.5, 0.0, 0.5, 1.0]])
            rows.append([step, "train", layer, ATTACKS[4], ATTACKS[5], float(step)])  # a crafted topic and metric
            if step % 2 == 0:
                rows += [[step, "train", layer, "activations", f"cka_matrix:{other}", 1.0 if i == j else 0.5]
                         for j, other in enumerate(LAYERS)]
    rows += [[3, "train", layer, "activations", "alert", 1.0, message] for layer, message in zip(LAYERS, ATTACKS)]
    return rows


def _graph() -> dict[str, Any]:
    def node(name: str, kind: str, op: str, parent: str | None = None) -> dict[str, Any]:
        return {"name": name, "kind": kind, "op": op, "parent": parent, "output_shapes": [[1, 4]],
                "dtypes": [ATTACKS[2][:20]]}

    nodes = [node("input", "input", ATTACKS[3]), node(BOX, "module", ATTACKS[1])]
    nodes += [{**node(layer, "module", kind, BOX if i >= 4 else None), "params": {ATTACKS[0]: [4, 4]},
               "num_params": 16} for i, (layer, kind) in enumerate(zip(LAYERS, TYPES))]
    nodes += [node(f"{BOX}/{ATTACKS[0]}", "function", ATTACKS[4], BOX), node("output", "output", ATTACKS[5])]
    chain = ["input", *LAYERS[:4], f"{BOX}/{ATTACKS[0]}", *LAYERS[4:], "output"]
    return {"version": 1, "model": ATTACKS[0], "device": ATTACKS[1], "num_params": 96, "nodes": nodes,
            "edges": [list(pair) for pair in itertools.pairwise(chain)]}


def _seed(url: str) -> None:
    layers = [{"name": layer, "type": kind, "params": {"weight": [4, 4]}} for layer, kind in zip(LAYERS, TYPES)]
    with httpx.Client(base_url=url, timeout=30) as client:
        for run in (RUN, OTHER):
            made = client.post("/api/v1/runs", json={"name": run, "model": ATTACKS[2], "framework": ATTACKS[3],
                                                     "config": {ATTACKS[0]: ATTACKS[1]}, "layers": layers})
            assert made.status_code == 201, made.text
            body = msgpack.packb({"batch_id": str(uuid.uuid4()), "records": _rows(run)})
            sent = client.post(f"/api/v1/runs/{quote(run, safe='')}/records", content=body,
                               headers={"content-type": "application/msgpack"})
            assert sent.status_code == 200, sent.text
        stored = client.put(f"/api/v1/runs/{quote(RUN, safe='')}/graph", json=_graph())
        assert stored.status_code == 200, stored.text
        crafted = _graph()
        crafted["nodes"][1]["kind"] = f'module" onmouseover="{PWN}'
        refused = client.put(f"/api/v1/runs/{quote(OTHER, safe='')}/graph", json=crafted)
        assert refused.status_code == 422 and "kind must be one of" in refused.json()["error"]
        assert client.post("/api/v1/runs", json={"name": "target"}).status_code == 201


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("security")
    store = tmp / "sonde.db"
    with SondeServe.running(store, tmp / "server.log") as served:
        _seed(served.url)
        yield served.url, store


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = chromium(pw)
        yield launched
        launched.close()


class Watch:
    """A page with listeners: dialogs (dismissed and counted), script errors, failed responses."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("response", self._response)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.url}")

    def clean(self, where: str) -> None:
        """Fail if anything an injection does happened on the page so far."""
        found = self.page.evaluate(INJECTED_JS)
        assert not self.dialogs, (where, self.dialogs)
        assert not found["pwned"] and not found["injected"], (where, found)
        assert not self.errors, (where, self.errors)

    def tooltip(self, chart: str, index: int = 0, *, expect: str) -> str:
        """Show the tooltip of ``chart``'s data item ``index``; fail at once if rendering it ran anything."""
        def shown() -> str | None:
            text = self.page.evaluate(TIP_JS, [chart, index])
            self.clean(f"the {chart} tooltip of item {index}")
            return text if text and expect in text else None

        return str(_wait(shown, 30, f"the {chart} tooltip to show {expect!r}"))


def test_no_string_in_the_store_runs_script_on_any_page(server: tuple[str, Path], browser: Any) -> None:
    url, _ = server
    watch = Watch(browser)
    page = watch.page

    # Runs page: both runs listed by their names, as text.
    page.goto(url + "/")
    _wait(lambda: page.locator("a[data-run-link]").count() >= 3, 30, "the runs table")
    names = page.locator("a[data-run-link]").all_inner_texts()
    assert RUN in names and OTHER in names
    watch.clean("runs page")

    # Run page: heatmap (rows are 'name · type'), lines, histograms, CKA, alerts; every tooltip rendered.
    page.goto(f"{url}/run/{quote(RUN, safe='')}")
    heat = watch.tooltip("heatmap", expect="onerror")
    assert f"layer {LAYERS[0]} · {TYPES[0]}" in heat  # the tooltip shows the names as text
    for index in range(1, STEPS * len(LAYERS), STEPS):  # a cell of every row
        watch.tooltip("heatmap", index, expect="step")
    watch.tooltip("lines", expect=" · ")
    watch.tooltip("histogram-left", expect="values in")
    cka = watch.tooltip("similarity", expect=" vs ")
    assert any(f"{layer} · {kind}" in cka for layer, kind in zip(LAYERS, TYPES))
    for index in range(0, len(LAYERS) ** 2, len(LAYERS) + 1):
        watch.tooltip("similarity", index, expect=" vs ")
    alerts = page.locator("[data-view=alerts]")
    _wait(lambda: sum(a in alerts.inner_text() for a in ATTACKS) >= 4, 20, "the alerts table (messages as text)")
    for select in page.locator(".q-select").all()[:4]:  # the choices (topics, metrics) open as text too
        select.click()
        page.keyboard.press("Escape")
    watch.clean("run page")

    # Graph page: boxes drawn, frames labelled, every hover card shown.
    page.goto(f"{url}/run/{quote(RUN, safe='')}/graph")
    nodes = page.locator("#sonde-graph .sg-node")
    _wait(lambda: nodes.count() >= len(LAYERS) + 2, 30, "the graph to draw")
    drawn = page.evaluate("() => [...document.querySelectorAll('#sonde-graph [data-node]')].map(g => g.dataset.node)")
    assert set(LAYERS) <= set(drawn)
    assert page.locator("#sonde-graph .sg-frame").count() >= 1
    tip = page.locator("#sonde-graph .sg-tip")
    cards = []
    for i in range(nodes.count()):
        name = nodes.nth(i).get_attribute("data-node")
        nodes.nth(i).hover(force=True)
        cards.append(_wait(lambda n=name: tip.is_visible() and (t := tip.inner_text()) and str(n) in t and t, 5,
                           f"the hover card of box {i}"))
    assert any(LAYERS[0] in c and "zero_frac" in c for c in cards)  # names and metrics as text
    assert any(f"⚠ step 3: {ATTACKS[0]}" in c for c in cards)  # alert messages as text
    watch.clean("graph page")

    # Compare page: both runs overlaid, the tooltip naming them.
    page.goto(f"{url}/compare?runs={quote(RUN, safe='')},{quote(OTHER, safe='')}")
    compared = watch.tooltip("compare", expect=RUN)
    assert OTHER in compared  # both runs named, as text
    watch.clean("compare page")
    assert not [f for f in watch.failed if "/api/" not in f and "favicon" not in f], watch.failed
    watch.context.close()


class _Attacker(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title><p>nothing to see</p>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_page_of_another_origin_cannot_write(server: tuple[str, Path], browser: Any) -> None:
    url, _ = server
    other = ThreadingHTTPServer(("127.0.0.1", free_port()), _Attacker)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        watch = Watch(browser)
        watch.page.goto(f"http://localhost:{other.server_address[1]}/")
        batch = msgpack.packb({"batch_id": str(uuid.uuid4()),
                               "records": [[0, "train", ATTACKS[0], "activations", "zero_frac", 1.0]]})
        seen = watch.page.evaluate(ATTACK_JS, [url, "target", list(batch)])
        assert seen["cors x-msgpack"].startswith("blocked")  # the preflight finds no CORS answer
        assert seen["no-cors text/plain"] == "opaque 0"  # sent: only the server can refuse it
        watch.context.close()
    finally:
        other.shutdown()
    with httpx.Client(base_url=url, timeout=30) as client:
        target = client.get("/api/v1/runs/target").json()
        assert target["steps"] == 0 and target["status"] == "running", target
        assert "planted" not in {r["name"] for r in client.get("/api/v1/runs").json()}
        # The same bytes from a client without a browser's Origin (a probe) are taken.
        ok = client.post("/api/v1/runs/target/records", content=batch, headers={"content-type": "application/msgpack"})
        assert ok.status_code == 200 and client.get("/api/v1/runs/target").json()["steps"] == 1


def test_a_token_link_opens_the_whole_page_and_drops_the_token(server: tuple[str, Path], browser: Any) -> None:
    _, store = server
    with serving(create_app(store, token=TOKEN)) as url:
        watch = Watch(browser)
        page = watch.page
        # The login form, asked to go somewhere crafted afterwards.
        page.goto(f"{url}/login?next=" + quote(f"/run/{ATTACKS[1]}{ATTACKS[0]}", safe=""))
        assert page.locator("input[type=password]").count() == 1
        watch.clean("login page")
        # Without the token: sent to the form.
        page.goto(url + "/")
        assert "/login" in page.url
        # The link: the cookie is set, the address loses the token, the page and its websocket work.
        page.goto(f"{url}/?token={TOKEN}")
        assert page.url == url + "/", page.url
        _wait(lambda: page.locator("a[data-run-link]").count() >= 3, 30, "the runs table")
        _wait(lambda: page.evaluate("() => window.did_handshake === true"), 15, "the websocket")
        cookies = {c["name"]: c for c in watch.context.cookies()}
        assert cookies["sonde_token"]["value"] == TOKEN and cookies["sonde_token"]["httpOnly"]
        link = page.locator("a[data-run-link]", has_text=OTHER)
        link.click()
        _wait(lambda: "/run/" in page.url and page.locator('[data-chart="heatmap"]').count(), 30, "the run page")
        assert TOKEN not in page.url and not watch.failed, watch.failed
        watch.clean("token link")
        watch.context.close()

