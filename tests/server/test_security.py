"""The guard in front of the server, in-process through httpx's ASGI transport.

Binary routes take only their own Content-Type; a write or a websocket from another origin is
refused; a loopback server without a token answers only loopback host names; a ``?token=`` link
sets the cookie and redirects to the clean address. The same refusals from a real page of another
origin, in Chromium, are in ``tests/e2e/test_security_browser.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from sonde.errors import ConfigError
from sonde.server.aggregator import create_aggregator_app
from sonde.server.api.common import MSGPACK_TYPES, TENSOR_TYPES
from sonde.server.api.security import same_origin, token_cookie
from sonde.server.api.tensors import TensorItem, encode_payload
from sonde.server.app import create_app
from sonde.sinks.outbox import Entry
from sonde.store import Store, open_store

EVIL = "http://evil.example:1234"


def call(app: FastAPI, method: str, url: str, *, base: str = "http://test", **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=base) as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "sonde.db") as s:
        yield s


@pytest.fixture
def app(store: Store) -> FastAPI:
    app = create_app(store, ui=False)
    created = call(app, "POST", "/api/v1/runs", json={"name": "r", "layers": [{"name": "fc1", "type": "Linear"}]})
    assert created.status_code == 201
    return app


def _batch(layer: str = "fc1") -> bytes:
    return msgpack.packb({"batch_id": str(uuid.uuid4()), "records": [[0, "train", layer, "weights", "norm", 1.0]]})


@pytest.mark.parametrize("kind", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x", "application/json", "application/octet-stream"])
def test_records_need_a_msgpack_content_type(app: FastAPI, store: Store, kind: str | None) -> None:
    headers = {} if kind is None else {"content-type": kind}
    refused = call(app, "POST", "/api/v1/runs/r/records", content=_batch(), headers=headers)
    assert refused.status_code == 415, refused.text
    assert "application/msgpack" in refused.json()["error"]
    assert store.load("r").empty
    for accepted in MSGPACK_TYPES:
        ok = call(app, "POST", "/api/v1/runs/r/records", content=_batch(), headers={"content-type": accepted})
        assert ok.status_code == 200 and ok.json()["accepted"] == 1
    assert len(store.load("r")) == len(MSGPACK_TYPES)


def test_tensors_need_their_content_type(app: FastAPI) -> None:
    body = encode_payload("b1", [TensorItem(0, "train", "fc1", "activations", np.ones((2, 3)), None,
                                            [{"name": "mean", "kwargs": {}}])])
    for kind in ("text/plain", "application/x-www-form-urlencoded", "application/msgpack"):
        refused = call(app, "POST", "/api/v1/runs/r/tensors", content=body, headers={"content-type": kind})
        assert refused.status_code == 415 and "application/octet-stream" in refused.json()["error"]
    ok = call(app, "POST", "/api/v1/runs/r/tensors", content=body, headers={"content-type": TENSOR_TYPES[0]})
    assert ok.status_code == 202, ok.text


def test_no_api_write_takes_a_type_any_page_may_send(app: FastAPI) -> None:
    """The JSON routes too: text/plain and form bodies are what a no-cors fetch or a form can send."""
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        made = call(app, "POST", "/api/v1/runs", content=b'{"name": "new"}', headers={"content-type": kind})
        assert made.status_code == 415, made.text
        finished = call(app, "POST", "/api/v1/runs/r/finish", content=b'{"status": "failed"}',
                        headers={"content-type": kind})
        assert finished.status_code == 415
    assert [r["name"] for r in call(app, "GET", "/api/v1/runs").json()] == ["r"]
    assert call(app, "GET", "/api/v1/runs/r").json()["status"] == "running"


def test_writes_from_another_origin_are_refused(app: FastAPI, store: Store) -> None:
    for origin in (EVIL, "null", "http://test.evil.example", "https://test:1", "garbage"):
        writes = [
            call(app, "POST", "/api/v1/runs", json={"name": "x"}, headers={"origin": origin}),
            call(app, "POST", "/api/v1/runs/r/records", content=_batch(),
                 headers={"origin": origin, "content-type": "application/msgpack"}),
            call(app, "PUT", "/api/v1/runs/r/graph", json={"nodes": [], "edges": []}, headers={"origin": origin}),
            call(app, "POST", "/api/v1/runs/r/finish", json={"status": "failed"}, headers={"origin": origin}),
            call(app, "DELETE", "/api/v1/runs/r", headers={"origin": origin}),
        ]
        for r in writes:
            assert r.status_code == 403, (origin, r.request.method, r.request.url, r.text)
            assert "cross-site" in r.json()["error"] and "--allow-origin" in r.json()["error"]
    assert store.load("r").empty and store.get_graph("r") is None
    assert call(app, "GET", "/api/v1/runs/r").json()["status"] == "running"
    # Reads carry no Origin check (a page of another site cannot read the answer: no CORS headers).
    assert call(app, "GET", "/api/v1/runs", headers={"origin": EVIL}).status_code == 200
    # The server's own pages and clients without Origin (the probe, scripts) write as before.
    same = call(app, "POST", "/api/v1/runs/r/records", content=_batch(),
                headers={"origin": "http://test", "content-type": "application/msgpack"})
    assert same.status_code == 200
    bare = call(app, "POST", "/api/v1/runs/r/records", content=_batch(),
                headers={"content-type": "application/msgpack"})
    assert bare.status_code == 200 and len(store.load("r")) == 2


def test_websockets_from_another_origin_are_refused(app: FastAPI) -> None:
    with TestClient(app) as client:  # its websocket requests carry Host: testserver
        with pytest.raises(WebSocketDisconnect) as refused, \
                client.websocket_connect("/_nicegui_ws/socket.io/", headers={"origin": EVIL}):
            pass
        assert refused.value.code == 1008
        with pytest.raises(WebSocketDisconnect) as unrouted, \
                client.websocket_connect("/_nicegui_ws/socket.io/", headers={"origin": "http://testserver"}):
            pass
        assert unrouted.value.code != 1008  # let through (to no route, in an app without the dashboard)


def test_behind_a_proxy_the_host_it_passes_on_or_an_allowed_origin_makes_a_page_same_origin(store: Store) -> None:
    app = create_app(store, ui=False)
    proxied = {"origin": "https://sonde.example.com", "host": "sonde.example.com"}  # proxy_set_header Host $host
    assert call(app, "POST", "/api/v1/runs", json={"name": "a"}, headers=proxied).status_code == 201
    rewritten = {"origin": "https://sonde.example.com", "host": "127.0.0.1:8080"}  # the proxy's default Host
    assert call(app, "POST", "/api/v1/runs", json={"name": "b"}, headers=rewritten).status_code == 403
    allowed = create_app(store, ui=False, allow_origins=["https://sonde.example.com"])
    assert call(allowed, "POST", "/api/v1/runs", json={"name": "b"}, headers=rewritten).status_code == 201
    assert call(allowed, "POST", "/api/v1/runs", json={"name": "c"},
                headers={**rewritten, "origin": EVIL}).status_code == 403
    with pytest.raises(ConfigError, match="scheme and a host"):
        create_app(store, ui=False, allow_origins=["sonde.example.com/dash"])


def test_same_origin_compares_host_and_port() -> None:
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("https://Sonde.Example.com", "sonde.example.com")
    assert not same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not same_origin("http://localhost:8080", "127.0.0.1:8080")
    assert not same_origin("null", "127.0.0.1:8080")
    assert not same_origin("http://user@127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("https://a.example", "127.0.0.1:8080", ["https://a.example/"])


def test_a_loopback_server_without_token_answers_only_loopback_host_names(store: Store) -> None:
    """A page of another site whose DNS name is rebound to 127.0.0.1 is same-origin to itself: refuse its Host."""
    app = create_app(store, ui=False)
    base = "http://127.0.0.1:8080"  # the ASGI scope's server: what uvicorn bound
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "sonde.localhost:8080"):
        assert call(app, "GET", "/api/v1/runs", base=base, headers={"host": host}).status_code == 200, host
    rebound = call(app, "GET", "/api/v1/runs", base=base, headers={"host": "evil.example:8080"})
    assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]
    allowed = create_app(store, ui=False, allow_origins=["http://sonde.lan:8080"])
    assert call(allowed, "GET", "/api/v1/runs", base=base, headers={"host": "sonde.lan:8080"}).status_code == 200
    tokened = create_app(store, ui=False, token="s3cret")  # the token guards it: any name may reach it
    assert call(tokened, "GET", "/api/v1/runs", base=base,
                headers={"host": "sonde.lan:8080", "authorization": "Bearer s3cret"}).status_code == 200


def test_a_token_link_sets_the_cookie_and_redirects_to_the_clean_address(store: Store) -> None:
    app = create_app(store, ui=False, token="s3cret")
    link = call(app, "GET", "/run/a%20b", params={"token": "s3cret", "tab": "x y"}, headers={"accept": "text/html"})
    assert link.status_code == 303
    assert link.headers["location"] == "/run/a%20b?tab=x+y"
    cookie = link.headers["set-cookie"]
    assert cookie.startswith("sonde_token=s3cret") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie
    again = call(app, "GET", "/api/v1/runs", headers={"cookie": cookie.split(";")[0]})
    assert again.status_code == 200
    bare = call(app, "GET", "/", params={"token": "s3cret"})
    assert bare.status_code == 303 and bare.headers["location"] == "/"
    sneaky = call(app, "GET", "http://test//evil.example/?token=s3cret")
    assert sneaky.status_code == 303 and sneaky.headers["location"] == "/evil.example/"  # stays on this site
    wrong = call(app, "GET", "/run/a", params={"token": "nope", "tab": "1"}, headers={"accept": "text/html"})
    assert wrong.status_code == 303 and wrong.headers["location"] == "/login?next=%2Frun%2Fa%3Ftab%3D1"
    login = call(app, "GET", "/login", params={"token": "s3cret", "next": "/run/a"})
    assert login.status_code == 303 and login.headers["location"] == "/run/a"
    assert "SameSite=Lax" in login.headers["set-cookie"] and "HttpOnly" in login.headers["set-cookie"]
    secure = call(app, "GET", "/", params={"token": "s3cret"}, base="https://sonde.example.com")
    assert "Secure" in secure.headers["set-cookie"]


def test_token_cookie_quotes_what_a_cookie_cannot_hold() -> None:
    from http.cookies import SimpleCookie

    value = token_cookie('a b;c"d')
    parsed: SimpleCookie = SimpleCookie()
    parsed.load(value.split("; Path")[0])
    assert parsed["sonde_token"].value == 'a b;c"d'


def test_the_aggregator_takes_only_msgpack_and_same_origin_writes() -> None:
    app = create_aggregator_app("http://127.0.0.1:9")  # nothing listens there: only the guard answers
    plain = call(app, "POST", "/api/v1/runs/r/records", content=_batch(), headers={"content-type": "text/plain"})
    assert plain.status_code == 415
    octet = call(app, "POST", "/api/v1/runs/r/records", content=_batch(),
                 headers={"content-type": "application/octet-stream"})
    assert octet.status_code == 415
    foreign = call(app, "POST", "/api/v1/runs/r/records", content=_batch(),
                   headers={"content-type": "application/msgpack", "origin": EVIL})
    assert foreign.status_code == 403


def test_sondes_own_clients_send_the_types_the_routes_take() -> None:
    routes = Entry._ROUTES
    assert routes["records"][2] in MSGPACK_TYPES and routes["tensors"][2] in TENSOR_TYPES
    assert {routes[k][2] for k in ("run", "finish", "graph")} == {"application/json"}
