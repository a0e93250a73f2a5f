"""The FastAPI app behind ``sonde serve``: REST API, the guard (host, origin, token, size), JSON errors, dashboard.

:func:`create_app` builds the app of the ``all`` and ``frontend`` roles: the store, the REST API
under ``/api/v1`` (OpenAPI at ``/openapi.json``), ``/login`` for browsers when a token is set,
and the NiceGUI dashboard (``sonde.server.ui.attach``) when that package is importable. The
``aggregator`` and ``evaluator`` roles have their own apps (``sonde.server.aggregator``,
``sonde.server.evaluator``); ``sonde serve --role`` picks one.

Every error is a 4xx JSON body ``{"error": "<what was wrong>"}`` — validation errors, unknown
routes and wrong methods included — or a 500 with the same shape for a fault of the server.

Example:
    >>> import httpx
    >>> app = create_app("sonde.db")                                        # doctest: +SKIP
    >>> async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:  # doctest: +SKIP
    ...     (await c.get("/api/v1/runs")).json()
    []
"""

from __future__ import annotations

import importlib
import inspect
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from sonde.errors import ConfigError, RunExistsError, StoreError
from sonde.server.api import PREFIX, api_router
from sonde.server.api.security import Guard, check_origins, login_response, token_cookie
from sonde.server.evaluator import evaluator_of
from sonde.store import Store, open_store

__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_PORTS", "ROLES", "create_app", "serve"]

log = logging.getLogger("sonde.server")

#: The roles ``sonde serve --role`` knows; ``create_app`` builds ``all`` and ``frontend``.
ROLES = ("all", "aggregator", "evaluator", "frontend")
#: The port each role listens on unless told otherwise.
DEFAULT_PORTS = {"all": 8080, "frontend": 8080, "evaluator": 8081, "aggregator": 8082}
#: Largest request body by default (64 MiB): a batch of ~2 million scalar Records.
DEFAULT_MAX_BODY = 64 << 20


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        got = err.get("input")
        got_text = "" if got is None or isinstance(got, (dict, list)) else f" (got {str(got)[:60]!r})"
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got_text}")
    more = len(exc.errors()) - 5
    return "invalid request: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _install_errors(app: FastAPI) -> None:
    ui_404 = app.exception_handlers.get(404)  # the dashboard's own page, when it has one

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        browser = "text/html" in request.headers.get("accept", "")
        if exc.status_code == 404 and ui_404 is not None and browser and not request.url.path.startswith("/api/"):
            result = ui_404(request, exc)
            return await result if hasattr(result, "__await__") else result  # type: ignore[no-any-return]
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; the API is under {PREFIX} (see /openapi.json)"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path} (see /openapi.json)"
        return JSONResponse({"error": str(detail)}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    async def sonde_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RunExistsError):
            return JSONResponse({"error": str(exc)}, status_code=409)
        if isinstance(exc, ConfigError):
            return JSONResponse({"error": str(exc)}, status_code=400)
        read_only = getattr(getattr(request.app.state, "store", None), "read_only", False)
        if read_only and request.method not in ("GET", "HEAD"):
            # A store opened read-only serves reads only; a client must not retry its writes.
            return JSONResponse({"error": str(exc)}, status_code=405, headers={"Allow": "GET, HEAD"})
        log.error("store error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": f"the store failed: {exc}"}, status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ConfigError, sonde_error)
    app.add_exception_handler(StoreError, sonde_error)
    for status in (404, 405):  # a status handler wins over the class handler; the UI may have set these
        app.exception_handlers.pop(status, None)


def _attach_ui(app: FastAPI, store: Store) -> None:
    try:
        ui = importlib.import_module("sonde.server.ui")
    except ImportError as exc:
        if exc.name not in ("sonde.server.ui", "nicegui"):
            log.warning("the dashboard (sonde.server.ui) failed to import: %s; serving the API only", exc)
        return
    ui.attach(app, store)


def create_app(
    store: str | Path | Store = "sonde.db",
    *,
    role: Literal["all", "frontend"] | str = "all",
    token: str | None = None,
    evaluator_url: str | None = None,
    frontend_url: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    ui: bool = True,
    allow_origins: Sequence[str] = (),
) -> FastAPI:
    """The app of the ``all`` or ``frontend`` role: REST API over ``store``, and the dashboard.

    Args:
        store: SQLite path, ``sqlite:``/``postgresql://`` URL, or an open Store (left open on shutdown).
        role: ``all`` (one process does everything) or ``frontend`` (stores and serves; heavy tasks
            go to the evaluator at ``evaluator_url``).
        token: access token every request must carry (``Authorization: Bearer``); None for none.
        evaluator_url: where the evaluator role listens (frontend role; kept on ``app.state``).
        frontend_url: this frontend's public URL, for roles that call back (kept on ``app.state``).
        max_body: largest request body in bytes (413 above it).
        ui: mount the NiceGUI dashboard when ``sonde.server.ui`` is importable.
        allow_origins: origins besides the server's own (``https://sonde.example.com``) whose pages
            may write and open the dashboard's websocket: where a reverse proxy that does not pass
            the ``Host`` header on serves the dashboard (see ``sonde.server.api.security``).

    Raises:
        ConfigError: an unknown role, or one that has its own app.
        StoreError: the store cannot be opened.

    Example:
        >>> app = create_app("runs/sonde.db", token="s3cret")   # doctest: +SKIP
    """
    if role not in ("all", "frontend"):
        hint = " (its app is sonde.server.aggregator/evaluator; use sonde serve --role)" if role in ROLES else ""
        raise ConfigError(f"create_app builds the 'all' and 'frontend' roles; got {role!r}{hint}")
    if token is not None and not token:
        raise ConfigError("token must be a non-empty string or None")
    allow_origins = check_origins(allow_origins)
    opened = store if isinstance(store, Store) else open_store(store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if opened is not store:  # opened here, so closed here; a Store passed in belongs to its caller
            opened.close()

    app = FastAPI(title="sonde", version="1", description="Probes for every layer of a network: REST API.",
                  lifespan=lifespan)
    app.state.store = opened
    app.state.role = role
    app.state.token = token
    app.state.evaluator_url = evaluator_url
    app.state.frontend_url = frontend_url
    app.state.evaluator_of = evaluator_of  # role all: the tensors route starts the evaluator on first use
    app.include_router(api_router())

    @app.get("/login", include_in_schema=False)
    def login(request: Request) -> Response:
        status, parts = login_response(request.scope.get("query_string", b""), token)
        if status == 303:
            response = RedirectResponse(parts["location"], status_code=303)
            if parts["cookie"] is not None:
                cookie = token_cookie(parts["cookie"], secure=request.url.scheme == "https")
                response.headers.append("set-cookie", cookie)
            return response
        return HTMLResponse(parts["html"], status_code=status)

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    def unknown_api_route(rest: str, request: Request) -> Response:
        # Before the dashboard mounts itself at "/": an unknown API path answers JSON, not a page.
        path = request.url.path
        for method in ("GET", "POST", "PUT", "DELETE"):  # does the path exist for another method?
            scope = {**request.scope, "method": method}
            if any(route.matches(scope)[0] is Match.FULL for route in app.router.routes
                   if not isinstance(route, Mount) and getattr(route, "name", None) != "unknown_api_route"):
                return JSONResponse({"error": f"{request.method} is not allowed on {path} (see /openapi.json)"},
                                    status_code=405)
        return JSONResponse({"error": f"no route {request.method} {path}; the API is under {PREFIX} "
                                      "(see /openapi.json)"}, status_code=404)

    if ui:
        _attach_ui(app, opened)
    _install_errors(app)
    app.add_middleware(Guard, token=token, max_body=max_body, allow_origins=allow_origins)
    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _role_app(role: str, **kwargs: Any) -> Any:
    """The aggregator's or evaluator's app, from its module, given the keyword arguments it accepts."""
    module = importlib.import_module(f"sonde.server.{role}")
    factory = getattr(module, f"create_{role}_app")
    accepted = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return factory(**{k: v for k, v in kwargs.items() if takes_all or k in accepted})


def serve(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    store: str = "sonde.db",
    role: str = "all",
    token: str | None = None,
    evaluator_url: str | None = None,
    frontend_url: str | None = None,
    allow_origins: Sequence[str] = (),
) -> None:
    """Run one role of the server with uvicorn until interrupted (what ``sonde serve`` does).

    Binding anything but a loopback address needs a token (``token`` or ``SONDE_TOKEN``).

    Raises:
        ConfigError: an unknown role, a non-loopback host without a token, or a malformed origin.

    Example:
        >>> serve(store="runs/sonde.db")                     # doctest: +SKIP
        sonde all on http://127.0.0.1:8080 (store runs/sonde.db)
    """
    import uvicorn

    if role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}; got {role!r}")
    token = token or os.environ.get("SONDE_TOKEN") or None
    allow_origins = check_origins(allow_origins)
    if not _loopback(host) and token is None:
        raise ConfigError(
            f"binding {host} exposes the server beyond this machine; give it a token with --token <secret> "
            "or SONDE_TOKEN=<secret> (clients then send 'Authorization: Bearer <secret>'), or bind 127.0.0.1"
        )
    port = DEFAULT_PORTS[role] if port is None else port
    evaluator_url = evaluator_url or f"http://127.0.0.1:{DEFAULT_PORTS['evaluator']}"
    frontend_url = frontend_url or f"http://127.0.0.1:{DEFAULT_PORTS['frontend']}"
    app: Any
    if role in ("all", "frontend"):
        app = create_app(store, role=role, token=token, allow_origins=allow_origins,
                         evaluator_url=None if role == "all" else evaluator_url, frontend_url=frontend_url)
    else:
        # The aggregator and the evaluator hand their results to the frontend, which owns the store.
        app = _role_app(role, token=token, evaluator_url=evaluator_url, frontend_url=frontend_url)
    shown = "[" + host + "]" if ":" in host else host
    print(f"sonde {role} on http://{shown}:{port} (store {store})" if role in ("all", "frontend")
          else f"sonde {role} on http://{shown}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
