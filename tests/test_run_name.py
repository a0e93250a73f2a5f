"""Run names are one URL path segment: refused at probe creation and by ``POST /api/v1/runs``."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient
from torch import nn

import sonde
from sonde.errors import ConfigError
from sonde.run_name import check_run_name
from sonde.server.app import create_app

UNREACHABLE = [".", "..", "a/b", "/", ""]


@pytest.mark.parametrize("name", UNREACHABLE)
def test_a_name_that_is_not_one_path_segment_is_refused_with_what_is_expected(name: str) -> None:
    with pytest.raises(ConfigError, match=r"one segment of a URL path .*not '\.' or '\.\.'"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["mlp", "run.1", "...", ".hidden", "a b", "ünï"])
def test_other_names_are_kept(name: str) -> None:
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", [".", ".."])
@pytest.mark.parametrize("where", ["store", "server"])
def test_a_probe_refuses_dot_names_before_anything_is_written(tmp_path: Path, name: str, where: str) -> None:
    target = {"store": tmp_path / "sonde.db"} if where == "store" else {
        "server": "http://127.0.0.1:9", "store": None}  # refused before any connection is tried
    with pytest.raises(ConfigError, match="one segment of a URL path"):
        sonde.probe(nn.Linear(2, 2), run=name, **target)
    assert list(tmp_path.iterdir()) == []  # no store, no spill directory


@pytest.mark.parametrize("name", [".", "..", "a/b"])
def test_the_api_refuses_dot_names_with_422(tmp_path: Path, name: str) -> None:
    app = create_app(tmp_path / "server.db", ui=False)
    try:
        response = TestClient(app).post("/api/v1/runs", json={"name": name})
        assert response.status_code == 422
        assert "one segment of a URL path" in response.json()["error"]
        assert TestClient(app).get("/api/v1/runs").json() == []
    finally:
        app.state.store.close()
