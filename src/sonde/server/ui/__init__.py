"""The live dashboard: NiceGUI pages on the server's own FastAPI app (one port, websocket push).

Pages:

* ``/`` — every run (name, model, framework, status, steps, start, last update), live.
* ``/run/{name}`` — network overview heatmap (layers × steps), training curves, per-layer
  lines, histograms over time, alerts; live while the run trains.
* ``/run/{name}/graph`` — the network's graph coloured by a metric, played through training.
* ``/compare?runs=a,b`` — one metric, several runs overlaid.

The pages read the store in-process (never through HTTP) and only through downsampled
queries. When the app carries a token (``create_app(token=...)``), every page asks for it.

Example:
    >>> from fastapi import FastAPI
    >>> from sonde.store import open_store
    >>> app = FastAPI()
    >>> attach(app, open_store("sonde.db"))     # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI, Request
from nicegui import ui
from starlette.types import ASGIApp, Receive, Scope, Send

from sonde.server.ui.layout import UIState, gate
from sonde.server.ui.source import Source
from sonde.store import Store

__all__ = ["attach"]

_SCOPE_KEY = "sonde.ui"
_pages_registered = False
_nicegui_configured = False


class _StateMiddleware:
    """Puts the app's :class:`UIState` into the ASGI scope, where the (process-wide) pages find it."""

    def __init__(self, app: ASGIApp, state: UIState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_SCOPE_KEY] = self.state
        await self.app(scope, receive, send)


def _state(request: Request) -> UIState:
    state = request.scope.get(_SCOPE_KEY)
    if state is None:  # pragma: no cover - only when a page is reached without attach()
        raise RuntimeError("the sonde dashboard was not attached to this app; call sonde.server.ui.attach(app, store)")
    return state  # type: ignore[no-any-return]


def _register_pages() -> None:
    """NiceGUI's pages are process-wide: register them once; each request brings its own store."""
    global _pages_registered
    if _pages_registered:
        return
    from sonde.server.ui.compare_page import build_compare_page
    from sonde.server.ui.run_page import build_run_page
    from sonde.server.ui.runs_page import build_runs_page

    @ui.page("/", title="Runs · sonde")
    async def runs_page(request: Request) -> None:
        state = _state(request)
        if gate(state, request):
            await build_runs_page(state)

    from sonde.server.ui.graph_page import register_graph_page

    register_graph_page(_state, gate)  # before the run page: its {name:path} would take ".../graph"

    @ui.page("/run/{name:path}", title="Run · sonde")
    async def run_page(request: Request, name: str) -> None:
        state = _state(request)
        if gate(state, request):
            await build_run_page(state, name)

    @ui.page("/compare", title="Compare · sonde")
    async def compare_page(request: Request, runs: str = "") -> None:
        state = _state(request)
        if gate(state, request):
            names = [n for n in runs.split(",") if n]
            params = {k: v for k, v in request.query_params.items() if k in ("topic", "metric", "layer", "phase")}
            await build_compare_page(state, names, params)

    _pages_registered = True


def attach(app: FastAPI, store: Store, **run_with: Any) -> None:
    """Mount the dashboard's pages on ``app`` (NiceGUI's ``ui.run_with``), reading ``store``.

    Call it before the app starts serving. The API routes keep precedence: NiceGUI is mounted
    at ``/`` after them. The token, if any, is read from ``app.state.token`` at each page load.

    Args:
        app: the server's FastAPI app.
        store: the store the pages read (in-process, no HTTP).
        run_with: extra keyword arguments for ``nicegui.ui.run_with`` (first call in a process only).

    Example:
        >>> app = create_app("sonde.db")   # calls attach(app, store) itself  # doctest: +SKIP
    """
    global _nicegui_configured
    # NiceGUI finds its server by walking gc.get_objects() at startup; touching torch's deprecated
    # ``reduce_op`` alias there warns on every start. The warning is about NiceGUI's walk, not the user.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
    _register_pages()
    app.add_middleware(_StateMiddleware, state=UIState(source=Source(store), app=app))
    if not _nicegui_configured:
        options: dict[str, Any] = {
            "title": "sonde", "favicon": "📡", "show_welcome_message": False, "reconnect_timeout": 10.0,
        }
        options.update(run_with)
        ui.run_with(app, **options)
        _nicegui_configured = True
        return
    # NiceGUI runs one UI per process: a second app (tests build many) shares its pages.
    from nicegui import core
    from nicegui.nicegui import _shutdown, _startup

    app.mount("/", core.app)
    inner = app.router.lifespan_context

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(a: Any) -> Any:
        await _startup()
        async with inner(a) as s:
            yield s
        await _shutdown()

    app.router.lifespan_context = lifespan
