"""The dashboard's pages over real HTTP (uvicorn on a thread): what each page answers, and the token.

What the pages draw in a browser, and how they update live, is tested in tests/e2e/test_dashboard.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from servers import serving
from sonde.records import Record
from sonde.server.app import create_app
from sonde.server.ui import attach
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import Store, open_store

HTML = {"accept": "text/html"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "sonde.db") as s:
        yield _seed(s)


def _seed(s: Store) -> Store:
    """One run "mlp" with two layers and five steps of zero_frac."""
    s.start_run(RunInfo("mlp", model="Sequential", framework="torch",
                        layers=[LayerInfo("fc1", "Linear", {"weight": [4, 2]}), LayerInfo("act", "ReLU")]))
    rng = np.random.default_rng(0)
    s.write("mlp", [Record("mlp", step, "train", layer, "activations", "zero_frac", float(rng.random()))
                    for step in range(5) for layer in ("fc1", "act")])
    return s


def test_pages_answer_with_the_runs(any_store: Store) -> None:
    """On SQLite, and on PostgreSQL when SONDE_TEST_POSTGRES_URL is set."""
    with serving(create_app(_seed(any_store))) as url:
        runs = httpx.get(url + "/", headers=HTML, timeout=20)
        assert runs.status_code == 200
        assert "<title>Runs · sonde</title>" in runs.text and "mlp" in runs.text and "Sequential" in runs.text
        run = httpx.get(url + "/run/mlp", headers=HTML, timeout=20)
        assert run.status_code == 200 and "Network overview" in run.text and "fc1 · Linear" in run.text
        missing = httpx.get(url + "/run/nope", headers=HTML, timeout=20)
        assert missing.status_code == 200 and "No run named" in missing.text
        compare = httpx.get(url + "/compare?runs=mlp", headers=HTML, timeout=20)
        assert compare.status_code == 200 and "Compare runs" in compare.text
        # The REST API keeps its routes next to the dashboard.
        assert [r["name"] for r in httpx.get(url + "/api/v1/runs", timeout=20).json()] == ["mlp"]


def test_a_token_guards_the_dashboard(store: Store) -> None:
    with serving(create_app(store, token="s3cret")) as url:
        refused = httpx.get(url + "/", headers=HTML, timeout=20)
        assert refused.status_code == 303 and refused.headers["location"].startswith("/login")
        form = httpx.get(url + "/login?next=/", timeout=20)
        assert form.status_code == 200 and "token" in form.text
        ok = httpx.get(url + "/", headers=HTML, cookies={"sonde_token": "s3cret"}, timeout=20)
        assert ok.status_code == 200 and "mlp" in ok.text
        wrong = httpx.get(url + "/run/mlp", headers=HTML, cookies={"sonde_token": "nope"}, timeout=20)
        assert wrong.status_code == 303


def test_attached_without_the_server_guard_the_pages_ask_for_the_token(store: Store) -> None:
    app = FastAPI()
    app.state.token = "s3cret"
    attach(app, store)
    with serving(app) as url:
        asked = httpx.get(url + "/run/mlp", headers=HTML, timeout=20)
        assert asked.status_code == 200 and "asks for a token" in asked.text and "Network overview" not in asked.text
        by_cookie = httpx.get(url + "/run/mlp", headers=HTML, cookies={"sonde_token": "s3cret"}, timeout=20)
        assert "Network overview" in by_cookie.text
        by_query = httpx.get(url + "/run/mlp?token=s3cret", headers=HTML, timeout=20)
        assert "Network overview" in by_query.text


def test_alerts_come_with_their_message(store: Store) -> None:
    import asyncio

    from sonde.server.ui.source import Source

    text = "layer 'act': 97% of its activations are zero"
    store.write("mlp", [Record("mlp", 3, "train", "act", "activations", "alert", 1.0, message=text),
                        Record("mlp", 4, "train", "fc1", "weight_updates", "alert", 1.0)])
    alerts = asyncio.run(Source(store).alerts("mlp"))
    assert [(a["step"], a["layer"], a["topic"], a["message"]) for a in alerts] == [
        (4, "fc1", "weight_updates", ""), (3, "act", "activations", text),
    ]
    store.start_run(RunInfo("calm"))
    assert asyncio.run(Source(store).alert_counts(["mlp", "calm"])) == {"mlp": 2}


def test_a_run_that_has_recorded_nothing_yet_has_a_page(tmp_path: Path) -> None:
    with open_store(tmp_path / "sonde.db") as s:
        s.start_run(RunInfo("fresh", layers=[LayerInfo("fc1", "Linear")]))
        with serving(create_app(s)) as url:
            page = httpx.get(url + "/run/fresh", headers=HTML, timeout=20)
            assert page.status_code == 200 and "Network overview" in page.text


def test_run_names_with_slashes_and_spaces_have_pages(tmp_path: Path) -> None:
    from urllib.parse import quote

    name = "sweep/lr 0.1"
    with open_store(tmp_path / "sonde.db") as s:
        s.start_run(RunInfo(name, layers=[LayerInfo("fc1", "Linear")]))
        with serving(create_app(s)) as url:
            runs = httpx.get(url + "/", headers=HTML, timeout=20)
            assert quote(name, safe="") in runs.text  # the link on the runs page
            page = httpx.get(f"{url}/run/{quote(name, safe='')}", headers=HTML, timeout=20)
            assert page.status_code == 200 and "Network overview" in page.text and "lr 0.1" in page.text
