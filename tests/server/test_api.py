"""The REST API in-process through httpx's ASGI transport: runs, ingest, queries, graph, errors, token, limits.

Expected series and heatmap values are computed here with numpy from the Records the test sent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from fastapi import FastAPI

from sonde.errors import ConfigError
from sonde.records import Record
from sonde.server.app import create_app, serve
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import Store, open_store

MSGPACK = {"content-type": "application/msgpack"}


class Api:
    """Synchronous calls into an ASGI app over httpx.ASGITransport (one event loop per call)."""

    def __init__(self, app: FastAPI, headers: dict[str, str] | None = None) -> None:
        self.app = app
        self.headers = headers or {}

    def __call__(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=self.headers) as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(go())

    def records(self, run: str, rows: list[list[Any]], batch_id: str | None = None) -> httpx.Response:
        body = msgpack.packb({"batch_id": batch_id or str(uuid.uuid4()), "records": rows})
        return self("POST", f"/api/v1/runs/{run}/records", content=body, headers=MSGPACK)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "sonde.db") as s:
        yield s


@pytest.fixture
def api(store: Store) -> Api:
    return Api(create_app(store, ui=False))


def _create(api: Api, name: str, layers: list[str], **extra: Any) -> httpx.Response:
    return api("POST", "/api/v1/runs", json={"name": name, "model": "MLP", "framework": "torch",
                                             "layers": [{"name": n, "type": "Linear"} for n in layers], **extra})


def test_runs_are_listed_a_page_at_a_time(api: Api) -> None:
    for name in ("a", "b", "c"):
        assert _create(api, name, ["fc1"]).status_code == 201
    names = lambda url: [r["name"] for r in api("GET", url).json()]  # noqa: E731
    assert names("/api/v1/runs") == ["a", "b", "c"]
    assert names("/api/v1/runs?limit=2") == ["a", "b"]
    assert names("/api/v1/runs?limit=2&offset=2") == ["c"]
    assert names("/api/v1/runs?offset=3") == []
    for bad in ("limit=0", "limit=1001", "offset=-1", "limit=x"):
        assert api("GET", f"/api/v1/runs?{bad}").status_code == 422, bad


def test_create_list_show_finish_and_resume(api: Api) -> None:
    layers = [{"name": "fc1", "type": "Linear", "params": {"weight": [8, 4], "bias": [8]}}]
    r = api("POST", "/api/v1/runs", json={"name": "mlp", "model": "MLP", "config": {"lr": 0.1}, "layers": layers})
    assert r.status_code == 201 and r.json() == {"name": "mlp", "first_step": 0}
    again = _create(api, "mlp", ["fc1"])
    assert again.status_code == 409 and "resume" in again.json()["error"]
    assert api.records("mlp", [[s, "train", "fc1", "weights", "norm", 1.0] for s in range(5)]).status_code == 200
    assert api("POST", "/api/v1/runs/mlp/finish", json={"status": "failed"}).json() == {"name": "mlp",
                                                                                        "status": "failed"}
    shown = api("GET", "/api/v1/runs/mlp").json()
    assert shown["status"] == "failed" and shown["steps"] == 5 and shown["config"] == {"lr": 0.1}
    assert shown["layers"] == 1 and shown["ended_at"] is not None
    assert [r["name"] for r in api("GET", "/api/v1/runs").json()] == ["mlp"]
    assert api("GET", "/api/v1/runs/mlp/layers").json() == [
        {"position": 0, "name": "fc1", "type": "Linear", "params": {"weight": [8, 4], "bias": [8]}}]
    resumed = _create(api, "mlp", ["fc1"], resume=True)
    assert resumed.status_code == 201 and resumed.json()["first_step"] == 5
    assert api("GET", "/api/v1/runs/mlp").json()["status"] == "running"


def test_ingested_series_downsamples_to_bucket_mean_min_max_and_keeps_a_spike(api: Api, store: Store) -> None:
    _create(api, "long", ["fc1", "fc2"])
    n = 20_000
    values = np.random.default_rng(0).normal(size=n)
    values[12_345] = 1e9
    rows = [[s, "train", "fc1", "weights", "norm", float(values[s])] for s in range(n)]
    for lo in range(0, n, 5000):
        r = api.records("long", rows[lo:lo + 5000])
        assert r.status_code == 200 and r.json() == {"accepted": 5000, "duplicate": False}
    r = api("GET", "/api/v1/runs/long/series", params={"layer": "fc1", "topic": "weights", "metric": "norm",
                                                       "max_points": 250})
    out = r.json()
    assert r.status_code == 200 and 1 < len(out["step"]) <= 250
    bounds = [*out["step"], n]
    for i in range(len(out["step"])):
        chunk = values[bounds[i]:bounds[i + 1]]
        assert out["value"][i] == pytest.approx(chunk.mean(), rel=1e-9, abs=1e-9)
        assert (out["min"][i], out["max"][i]) == (pytest.approx(chunk.min()), pytest.approx(chunk.max()))
    assert max(out["max"]) == 1e9
    window = api("GET", "/api/v1/runs/long/series", params={"layer": "fc1", "topic": "weights", "metric": "norm",
                                                            "start": 100, "end": 109}).json()
    assert window["step"] == list(range(100, 110)) and window["value"] == values[100:110].tolist()


def test_replayed_batch_is_stored_once(api: Api, store: Store) -> None:
    _create(api, "r", ["fc1"])
    rows = [[s, "train", "fc1", "weights", "norm", float(s)] for s in range(100)]
    first = api.records("r", rows, batch_id="batch-1")
    replay = api.records("r", rows, batch_id="batch-1")
    assert first.json() == {"accepted": 100, "duplicate": False}
    assert replay.status_code == 200 and replay.json() == {"accepted": 0, "duplicate": True}
    assert len(store.load("r")) == 100


def test_heatmap_histograms_and_metrics(api: Api) -> None:
    layers = ["conv", "fc", "head"]
    _create(api, "h", layers)
    rng = np.random.default_rng(1)
    table = rng.normal(size=(3, 60))
    table[1, 7] = np.nan
    table[2, 9] = np.inf
    rows = [[s, "train", name, "activations", "mean", float(table[i, s])] for s in range(60) for i, name in
            enumerate(layers)]
    edges = np.linspace(-2, 2, 5)
    counts = rng.integers(0, 50, size=(60, 4)).astype(float)
    rows += [[0, "train", "fc", "weights", "histogram_edges", edges.tolist()]]
    rows += [[s, "train", "fc", "weights", "histogram", counts[s].tolist()] for s in range(60)]
    rows += [[s, "train", "", "loss", "loss", 1.0 / (s + 1)] for s in range(60)]
    assert api.records("h", rows).status_code == 200
    heat = api("GET", "/api/v1/runs/h/heatmap", params={"topic": "activations", "metric": "mean",
                                                        "max_steps": 12}).json()
    assert heat["layers"] == layers and len(heat["steps"]) == 12 and heat["steps"][0] == 0 and heat["steps"][-1] == 59
    for i in range(3):
        expected = [None if not np.isfinite(table[i, s]) else pytest.approx(table[i, s]) for s in heat["steps"]]
        assert heat["values"][i] == expected
    full = api("GET", "/api/v1/runs/h/heatmap", params={"topic": "activations", "metric": "mean"}).json()
    assert full["steps"] == list(range(60)) and full["values"][1][7] is None and full["values"][2][9] is None
    zoom = api("GET", "/api/v1/runs/h/heatmap", params={"topic": "activations", "metric": "mean", "start": 5,
                                                        "end": 45, "max_steps": 5}).json()
    assert zoom["layers"] == layers and zoom["steps"] == [5, 15, 25, 35, 45]  # evenly inside the range
    for i in range(3):
        assert zoom["values"][i] == [None if not np.isfinite(table[i, s]) else pytest.approx(table[i, s])
                                     for s in zoom["steps"]]
    window = api("GET", "/api/v1/runs/h/heatmap", params={"topic": "activations", "metric": "mean", "start": 6,
                                                          "end": 10}).json()
    assert window["steps"] == [6, 7, 8, 9, 10] and window["values"][1][1] is None and window["values"][2][3] is None
    for bad in ({"start": -1}, {"end": "x"}, {"start": 2**31}):
        r = api("GET", "/api/v1/runs/h/heatmap", params={"topic": "activations", "metric": "mean", **bad})
        assert r.status_code == 422 and next(iter(bad)) in r.json()["error"]
    hist = api("GET", "/api/v1/runs/h/histograms", params={"layer": "fc", "topic": "weights", "max_steps": 6}).json()
    assert hist["edges"] == edges.tolist() and len(hist["steps"]) == 6
    assert hist["counts"] == [counts[s].tolist() for s in hist["steps"]]
    assert api("GET", "/api/v1/runs/h/metrics").json() == [
        ["train", "activations", "mean"], ["train", "loss", "loss"], ["train", "weights", "histogram"],
        ["train", "weights", "histogram_edges"]]


def test_graph_put_get_and_delete_run(api: Api, store: Store) -> None:
    _create(api, "g", ["fc1"])
    _create(api, "keep", ["fc1"])
    assert api("GET", "/api/v1/runs/g/graph").status_code == 404
    graph = {"version": 1, "model": "MLP", "nodes": [
        {"name": "input", "kind": "input", "op": "Tensor", "parent": None, "output_shapes": [[8, 4]]},
        {"name": "fc1", "kind": "module", "op": "Linear", "parent": None, "output_shapes": [[8, 2]],
         "params": {"weight": [2, 4]}, "num_params": 8}], "edges": [["input", "fc1"]]}
    assert api("PUT", "/api/v1/runs/g/graph", json=graph).status_code == 200
    assert api("GET", "/api/v1/runs/g/graph").json() == graph
    assert api("PUT", "/api/v1/runs/g/graph", json=[1, 2]).status_code == 422
    api.records("g", [[0, "train", "fc1", "weights", "norm", 1.0]])
    api.records("keep", [[0, "train", "fc1", "weights", "norm", 2.0]])
    r = api("DELETE", "/api/v1/runs/g")
    assert r.status_code == 200 and r.json() == {"deleted": "g"}
    for url in ("/api/v1/runs/g", "/api/v1/runs/g/graph", "/api/v1/runs/g/layers"):
        assert api("GET", url).status_code == 404
    assert api("DELETE", "/api/v1/runs/g").status_code == 404
    assert store.load("keep")["value"].tolist() == [2.0]


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"\xc1", 400, "msgpack"),
    (msgpack.packb([1, 2]), 422, "keys batch_id and records"),
    (msgpack.packb({"batch_id": "", "records": []}), 422, "batch_id"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "weights", "norm"]]}), 422, "record 0"),
    (msgpack.packb({"batch_id": "b", "records": [[-1, "train", "fc1", "weights", "norm", 1.0]]}), 422, "step"),
    (msgpack.packb({"batch_id": "b", "records": [[2**40, "train", "fc1", "weights", "norm", 1.0]]}), 422, "step"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "weights", "norm", "x"]]}), 422, "value"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "", "fc1", "weights", "norm", 1.0]]}), 422, "phase"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "f\x00", "weights", "norm", 1.0]]}), 422, "NUL"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "a", "alert", 1.0, 7]]}), 422, "message"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "a", "alert", 1.0, "x" * 10_001]]}), 422,
     "message"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "a", "alert", 1.0, "dead\x00"]]}), 422, "NUL"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "a", "alert", 1.0, "m", "extra"]]}), 422,
     "record 0"),
    (msgpack.packb({"batch_id": "b", "records": [[0, "train", "fc1", "w", "norm", 1.0],
                                                 [1, "train", "fc1", "a", "alert", 1.0, None]]}), 422, "record 1"),
])
def test_malformed_batches_are_4xx_json_and_store_nothing(api: Api, store: Store, body: bytes, status: int,
                                                          words: str) -> None:
    _create(api, "m", ["fc1"])
    r = api("POST", "/api/v1/runs/m/records", content=body, headers=MSGPACK)
    assert r.status_code == status and words in r.json()["error"]
    assert store.load("m").empty


def test_every_error_is_json(api: Api) -> None:
    cases = [
        ("GET", "/api/v1/nothing-here", 404), ("GET", "/api/v2/runs", 404), ("GET", "/api/v1/runs/absent", 404),
        ("GET", "/no/such/page", 404), ("DELETE", "/api/v1/runs", 405),
        ("GET", "/api/v1/runs/absent/series?layer=a&topic=b&metric=c", 404),
        ("POST", "/api/v1/runs", 422), ("POST", "/api/v1/runs/absent/finish", 422),
    ]
    for method, url, status in cases:
        r = api(method, url)
        assert r.status_code == status, (method, url, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"], (method, url)
    _create(api, "e", ["fc1"])
    bad = api("GET", "/api/v1/runs/e/series", params={"layer": "fc1", "topic": "w", "metric": "m", "max_points": 0})
    assert bad.status_code == 422 and "max_points" in bad.json()["error"]
    nul = api("GET", "/api/v1/runs/e/series", params={"layer": "f\x00", "topic": "w", "metric": "m"})
    assert nul.status_code == 422 and "NUL" in nul.json()["error"]
    slash = api("POST", "/api/v1/runs", json={"name": "a/b"})
    assert slash.status_code == 422 and "name" in slash.json()["error"]


def test_token_is_required_on_every_call_when_configured(store: Store) -> None:
    app = create_app(store, token="s3cret", ui=False)
    anonymous, wrong, right = Api(app), Api(app, {"authorization": "Bearer nope"}), \
        Api(app, {"authorization": "Bearer s3cret"})
    for client in (anonymous, wrong):
        for method, url in (("GET", "/api/v1/runs"), ("POST", "/api/v1/runs"), ("GET", "/openapi.json")):
            r = client(method, url)
            assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert _create(right, "t", ["fc1"]).status_code == 201
    assert right("GET", "/api/v1/runs").json()[0]["name"] == "t"
    page = anonymous("GET", "/", headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    form = anonymous("GET", "/login")
    assert form.status_code == 200 and "token" in form.text
    assert anonymous("GET", "/login", params={"token": "nope"}).status_code == 401
    login = anonymous("GET", "/login", params={"token": "s3cret", "next": "/run/t"})
    assert login.status_code == 303 and login.headers["location"] == "/run/t"
    cookie = login.headers["set-cookie"].split(";")[0]
    assert Api(app, {"cookie": cookie})("GET", "/api/v1/runs").status_code == 200
    assert anonymous("GET", "/api/v1/runs", params={"token": "s3cret"}).status_code == 401  # not for the API
    link = anonymous("GET", "/no-page", params={"token": "s3cret", "x": "1"})  # a page link: cookie, clean URL
    assert link.status_code == 303 and link.headers["location"] == "/no-page?x=1" and "sonde_token=" in \
        link.headers["set-cookie"]
    evil = anonymous("GET", "/login", params={"token": "s3cret", "next": "//evil.example"})
    assert evil.headers["location"] == "/"


def test_oversized_bodies_get_413(store: Store) -> None:
    api = Api(create_app(store, ui=False, max_body=10_000))
    _create(api, "big", ["fc1"])
    rows = [[s, "train", "fc1", "weights", "norm", 1.0] for s in range(2000)]
    r = api.records("big", rows)
    assert r.status_code == 413 and "limit of 10000 bytes" in r.json()["error"]
    body = msgpack.packb({"batch_id": "b", "records": rows})

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while streaming
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    streamed = api("POST", "/api/v1/runs/big/records", content=chunks(), headers=MSGPACK)
    assert streamed.status_code == 413
    assert store.load("big").empty
    assert api.records("big", rows[:10]).json()["accepted"] == 10  # small batches still go through


def test_serve_refuses_a_public_address_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SONDE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="--token"):
        serve(host="0.0.0.0", store="unused.db")
    with pytest.raises(ConfigError, match="--role"):
        serve(role="everything")
    with pytest.raises(ConfigError, match="'all' and 'frontend'"):
        create_app(":memory:", role="evaluator")


def test_api_on_postgresql(pg_url: str) -> None:
    with open_store(pg_url) as store:
        api = Api(create_app(store, ui=False))
        _create(api, "pg", ["fc1"])
        values = np.random.default_rng(2).normal(size=5000)
        rows = [[s, "train", "fc1", "weights", "norm", float(values[s])] for s in range(5000)]
        assert api.records("pg", rows, batch_id="once").json()["accepted"] == 5000
        assert api.records("pg", rows, batch_id="once").json()["duplicate"] is True
        out = api("GET", "/api/v1/runs/pg/series", params={"layer": "fc1", "topic": "weights", "metric": "norm",
                                                           "max_points": 100}).json()
        bounds = [*out["step"], 5000]
        assert len(out["step"]) <= 100
        for i in range(len(out["step"])):
            chunk = values[bounds[i]:bounds[i + 1]]
            assert (out["min"][i], out["max"][i]) == (pytest.approx(chunk.min()), pytest.approx(chunk.max()))
        assert api("DELETE", "/api/v1/runs/pg").status_code == 200
        assert store.run_infos() == []


def test_cli_serve_refuses_a_public_address_without_token(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from sonde.cli import main

    monkeypatch.delenv("SONDE_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--host", "0.0.0.0", "--store", "unused.db"])
    assert exit_info.value.code == 2 and "--token" in capsys.readouterr().err


def test_with_the_dashboard_mounted_api_errors_stay_json(store: Store) -> None:
    api = Api(create_app(store))  # the dashboard mounts itself at "/" and catches every other path
    for method, url, status in (("GET", "/api/v1/nope", 404), ("DELETE", "/api/v1/runs", 405),
                                ("GET", "/api/v1/runs/absent", 404)):
        r = api(method, url)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (method, url)
        assert r.json()["error"]
    assert api("GET", "/api/v1/runs").json() == []


def test_a_seventh_element_is_the_message_stored_as_the_local_store_keeps_it(api: Api, store: Store) -> None:
    _create(api, "wire", ["fc1", "fc2"])
    dead = "layer 'fc2': 100% of its activations are exactly zero at step 3 (dead units; threshold 90%)"
    plain = [[s, "train", layer, "activations", "zero_frac", 0.25 * s] for s in range(5) for layer in ("fc1", "fc2")]
    assert api.records("wire", plain[:4]).json() == {"accepted": 4, "duplicate": False}  # 6 elements: as before
    mixed = [*plain[4:], [3, "train", "fc2", "activations", "alert", 1.0, dead],
             [4, "eval", "", "loss", "alert", 1.0, "NaN/Inf — première"],
             [4, "train", "fc1", "weights", "norm", 2.0, ""]]
    assert api.records("wire", mixed).json() == {"accepted": 9, "duplicate": False}
    got = store.load("wire", messages=True)
    alerts = got[got["metric"] == "alert"]
    assert alerts[["step", "phase", "layer", "message"]].values.tolist() == [
        [3, "train", "fc2", dead], [4, "eval", "", "NaN/Inf — première"]]
    assert alerts["value"].tolist() == [1.0, 1.0]
    assert (got.loc[got["metric"] != "alert", "message"] == "").all() and len(got) == 13
    # The same Records written by a local StoreSink's path (Store.write) read back identically.
    store.start_run(RunInfo("local", layers=[LayerInfo("fc1", "Linear"), LayerInfo("fc2", "Linear")]))
    store.write("local", [Record("local", *row) for row in plain + mixed[6:]])
    local = store.load("local", messages=True)
    assert local.drop(columns="run").equals(got.drop(columns="run"))


def test_query_answers_are_bounded_and_say_when_they_cut(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from sonde.store import queries

    _create(api, "big", ["fc"])
    bins, steps = 20_000, 30  # a histogram far finer than the Histogram metric allows, stored through the API
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(steps, bins)).astype(float)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    rows = [[0, "train", "fc", "weights", "histogram_edges", edges.tolist()]]
    rows += [[s, "train", "fc", "weights", "histogram", counts[s].tolist()] for s in range(steps)]
    assert api.records("big", rows).status_code == 200
    hist = api("GET", "/api/v1/runs/big/histograms", params={"layer": "fc", "topic": "weights"}).json()
    assert hist["truncated"] is True
    assert len(hist["steps"]) == queries.MAX_CELLS // bins  # 25 of the 30 steps, evenly, first and last kept
    assert hist["steps"][0] == 0 and hist["steps"][-1] == steps - 1
    merged = len(hist["counts"][0])
    assert merged <= queries.MAX_BINS and len(hist["edges"]) == merged + 1
    assert hist["edges"][0] == -1.0 and hist["edges"][-1] == 1.0
    for step, row in zip(hist["steps"], hist["counts"]):
        assert sum(row) == counts[step].sum()  # merged bins: adjacent counts summed, none lost
    assert len(hist["steps"]) * merged <= queries.MAX_CELLS
    # A heatmap of more layers than it may hold: fewer rows, fewer columns, and the flag.
    monkeypatch.setattr(queries, "MAX_LAYERS", 3)
    monkeypatch.setattr(queries, "MAX_CELLS", 12)
    layers = [f"l{i}" for i in range(5)]
    _create(api, "wide", layers)
    assert api.records("wide", [[s, "train", n, "activations", "mean", float(s)] for s in range(10)
                                for n in layers]).status_code == 200
    heat = api("GET", "/api/v1/runs/wide/heatmap", params={"topic": "activations", "metric": "mean"}).json()
    assert heat["truncated"] is True and heat["layers"] == layers[:3] and len(heat["steps"]) == 4
    assert heat["values"] == [[float(s) for s in heat["steps"]]] * 3
    monkeypatch.setattr(queries, "MAX_LAYERS", 10)
    monkeypatch.setattr(queries, "MAX_CELLS", 50)
    whole = api("GET", "/api/v1/runs/wide/heatmap", params={"topic": "activations", "metric": "mean"}).json()
    assert whole["truncated"] is False and len(whole["layers"]) == 5 and len(whole["steps"]) == 10


def _nested(depth: int) -> dict[str, Any]:
    config: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        config = {"a": config}
    return config


def test_a_run_config_too_deep_or_too_large_is_a_422(api: Api) -> None:
    assert _create(api, "ok", [], config=_nested(32)).status_code == 201
    deep = _create(api, "deep", [], config=_nested(300))
    assert deep.status_code == 422 and "at most 32 levels" in deep.json()["error"]
    large = _create(api, "large", [], config={"notes": "x" * (64 << 10)})
    assert large.status_code == 422 and "at most 65536 bytes" in large.json()["error"]
    assert [run["name"] for run in api("GET", "/api/v1/runs").json()] == ["ok"]
    assert api("GET", "/api/v1/runs/ok").json()["config"] == _nested(32)


def test_a_stored_config_that_cannot_be_shown_never_breaks_the_listing(api: Api, store: Store,
                                                                      tmp_path: Path) -> None:
    import json
    import sqlite3

    for name in ("before", "bad", "unreadable"):
        assert _create(api, name, ["fc"], config={"lr": 0.1}).status_code == 201
    # Rows written by an older sonde, or by hand: a config nested 300 deep, and one that is not JSON.
    with sqlite3.connect(tmp_path / "sonde.db") as db:
        db.execute("UPDATE runs SET config = ? WHERE name = 'bad'", (json.dumps(_nested(300)),))
        db.execute("UPDATE runs SET config = ? WHERE name = 'unreadable'", ("{not json",))
    listing = api("GET", "/api/v1/runs")
    assert listing.status_code == 200
    by_name = {run["name"]: run for run in listing.json()}
    assert by_name["before"]["config"] == {"lr": 0.1}
    for name in ("bad", "unreadable"):
        assert set(by_name[name]["config"]) == {"error"} and "not shown" in by_name[name]["config"]["error"]
        one = api("GET", f"/api/v1/runs/{name}")
        assert one.status_code == 200 and one.json()["config"] == by_name[name]["config"]
    assert "at most 32 levels" in by_name["bad"]["config"]["error"]
