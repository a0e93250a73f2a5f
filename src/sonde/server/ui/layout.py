"""What every dashboard page shares: the header, the token gate, and how times and states read.

Example:
    >>> ago(10.0, now=70.0)
    '1 min ago'
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from nicegui import ui

from sonde.server.ui.source import Source

__all__ = ["COOKIE", "UIState", "ago", "frame", "gate", "stamp", "status_color"]

#: The cookie that carries the dashboard token (set by the token form, sent with every page load).
COOKIE = "sonde_token"
_STATUS_COLORS = {"running": "blue-7", "stalled": "orange-8", "finished": "green-7", "failed": "red-7"}

_CSS = """
body { background: #f6f7f9; }
.sonde-card { width: 100%; border-radius: 10px; box-shadow: 0 1px 3px rgba(16,24,40,.08); }
.sonde-muted { color: #667085; font-size: 0.8rem; }
.sonde-stat .label { color: #667085; font-size: 0.72rem; text-transform: uppercase; letter-spacing: .04em; }
.sonde-stat .value { font-size: 1.05rem; font-weight: 600; }
.nicegui-echart { width: 100%; }
"""


@dataclass
class UIState:
    """What the pages of one app read: its store (through a :class:`Source`) and its FastAPI app.

    Example:
        >>> state = UIState(Source(open_store("sonde.db")), app)   # doctest: +SKIP
        >>> state.token() is None                                   # doctest: +SKIP
        True
    """

    source: Source
    app: FastAPI

    def token(self) -> str | None:
        """The token the app was created with (``create_app(token=...)``), or None."""
        state = self.app.state
        for name in ("token", "sonde_token"):
            value = getattr(state, name, None)
            if value:
                return str(value)
        return None


def status_color(status: str) -> str:
    """Quasar colour of a run status badge.

    Example:
        >>> status_color("failed")
        'red-7'
    """
    return _STATUS_COLORS.get(status, "grey-7")


def stamp(seconds: float | None) -> str:
    """A UTC timestamp as ``2026-11-21 03:37:13``; ``–`` for none.

    Example:
        >>> stamp(0.0)
        '1970-01-01 00:00:00'
    """
    if seconds is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def ago(seconds: float | None, *, now: float | None = None) -> str:
    """How long ago a UTC timestamp was, in words a person scans: ``4 s ago``, ``3 min ago``, ``2 h ago``.

    Example:
        >>> ago(0.0, now=7200.0)
        '2 h ago'
    """
    if seconds is None:
        return "–"
    delta = max(0.0, (time.time() if now is None else now) - seconds)
    if delta < 60:
        return f"{delta:.0f} s ago"
    if delta < 3600:
        return f"{delta / 60:.0f} min ago"
    if delta < 86400:
        return f"{delta / 3600:.0f} h ago"
    return f"{delta / 86400:.0f} d ago"


def frame(title: str) -> None:
    """The page's title, stylesheet and header with the navigation.

    Example:
        >>> frame("Runs")   # inside a @ui.page function  # doctest: +SKIP
    """
    ui.page_title(f"{title} · sonde")
    ui.add_css(_CSS)
    ui.colors(primary="#3949ab", secondary="#26a69a", accent="#f28e2b")
    with ui.header().classes("items-center px-6 py-2 bg-white text-grey-9").style(
        "border-bottom: 1px solid #e4e7ec"
    ):
        with ui.link(target="/").classes("no-underline text-grey-9 flex items-center gap-2"):
            ui.icon("sensors", size="26px").classes("text-primary")
            ui.label("sonde").classes("text-xl font-bold tracking-tight")
        ui.label(title).classes("text-grey-7 ml-4 text-base")
        ui.space()
        ui.link("Runs", "/").classes("text-grey-8 no-underline font-medium mx-3")
        ui.link("Compare", "/compare").classes("text-grey-8 no-underline font-medium mx-3")


def gate(state: UIState, request: Request) -> bool:
    """True when the page may be shown; otherwise draws the token form and returns False.

    ``create_app``'s guard already sends a browser without the token to ``/login``; this gate
    holds for an app that mounts the dashboard without that guard. The token is accepted as the
    ``sonde_token`` cookie, a bearer header, or a ``?token=`` query parameter (kept in the cookie).

    Example:
        >>> if gate(state, request):          # doctest: +SKIP
        ...     await build_runs_page(state)
    """
    token = state.token()
    if token is None or _authorized(request, token):
        return True
    given = request.query_params.get("token", "")
    if given and hmac.compare_digest(given.encode(), token.encode()):
        ui.run_javascript(_set_cookie_js(given))
        return True
    frame("Token required")
    with ui.column().classes("w-full items-center mt-24"), ui.card().classes("sonde-card p-6 max-w-md"):
        ui.label("This sonde server asks for a token").classes("text-lg font-semibold")
        ui.label("It was started with --token (or SONDE_TOKEN). Paste that token to open the dashboard.").classes(
            "sonde-muted"
        )
        field = ui.input("Token", password=True, password_toggle_button=True).classes("w-full").props(
            "autofocus outlined dense"
        )
        if given or request.cookies.get(COOKIE):
            ui.label("That token is not the server's token.").classes("text-negative text-sm")

        def submit() -> None:
            ui.run_javascript(_set_cookie_js(str(field.value or "")) + "; location.reload();")

        field.on("keydown.enter", submit)
        ui.button("Open dashboard", on_click=submit).props("unelevated").classes("w-full mt-2")
    return False


def _authorized(request: Request, token: str) -> bool:
    from sonde.server.api.security import authorized

    if authorized({k.lower(): v for k, v in request.headers.items()}, token):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(unquote(cookie).encode(), token.encode())


def _set_cookie_js(token: str) -> str:
    return f"document.cookie = {COOKIE!r} + '=' + encodeURIComponent({json.dumps(token)}) + '; path=/; SameSite=Strict'"


def stat(label: str, value: Any) -> ui.label:
    """A small labelled figure of a page header; returns the value label (to update it live).

    Example:
        >>> steps = stat("steps", 120)   # doctest: +SKIP
        >>> steps.text = "121"           # doctest: +SKIP
    """
    with ui.column().classes("sonde-stat gap-0"):
        ui.label(label).classes("label")
        return ui.label(str(value)).classes("value")
