"""The runs page and the REST API show a running run whose writer went silent as ``stalled``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from servers import serving
from sonde.server.app import create_app
from sonde.server.ui.layout import status_color
from sonde.server.ui.runs_page import table_row
from sonde.sinks.base import RunInfo
from sonde.store import Store, open_store
from sonde.store.schema import runs

HTML = {"accept": "text/html"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "sonde.db") as s:
        for name in ("alive", "killed", "done"):
            s.start_run(RunInfo(name, model="MLP"), resume=False)
        s.finish_run("done", "finished")
        with s.engine.connect() as conn, conn.begin():  # silent for 10 minutes
            conn.execute(update(runs).where(runs.c.name.in_(["killed", "done"]))
                         .values(heartbeat_at=time.time() - 600))
        yield s


def test_the_runs_page_and_the_api_show_a_silent_running_run_as_stalled(store: Store) -> None:
    with serving(create_app(store)) as url:
        listed = {r["name"]: r["status"] for r in httpx.get(url + "/api/v1/runs", timeout=20).json()}
        assert listed == {"alive": "running", "killed": "stalled", "done": "finished"}
        shown = httpx.get(url + "/api/v1/runs/killed", timeout=20).json()
        assert shown["status"] == "stalled" and shown["heartbeat_at"] < time.time() - 500
        page = httpx.get(url + "/", headers=HTML, timeout=20)
        assert page.status_code == 200
        assert "1 running · 1 stalled" in page.text and '"status":"stalled"' in page.text.replace(" ", "")


def test_a_stalled_row_has_its_own_colour_and_says_when_it_was_last_alive() -> None:
    row = table_row({"name": "killed", "model": "MLP", "framework": "torch", "status": "stalled", "steps": 3,
                     "started_at": 0.0, "updated_at": 0.0, "ended_at": None, "heartbeat_at": 0.0}, now=180.0)
    assert row["status"] == "stalled" and row["alive"] == "3 min ago"
    assert row["color"] == status_color("stalled") not in {status_color(s) for s in ("running", "finished", "failed")}
