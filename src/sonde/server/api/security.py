"""Access token and request size limit: one ASGI middleware in front of the whole app.

* **Token.** When the app has a token (``sonde serve --token`` or ``SONDE_TOKEN``), every request
  must carry it, as ``Authorization: Bearer <token>`` (API clients, remote probes) or as the
  ``sonde_token`` cookie that ``GET /login?token=<token>`` sets (browsers: the dashboard and its
  websocket); a dashboard page (not the API) may also be opened with ``?token=<token>``. Without
  it, API paths answer 401 JSON and browser pages redirect to ``/login``, a small form that asks
  for the token.
* **Size.** A request body above ``max_body`` bytes answers 413 JSON before any handler runs
  (checked on ``Content-Length`` and again while the body streams in).

Example:
    >>> app.add_middleware(Guard, token="s3cret", max_body=64 << 20)   # doctest: +SKIP
    >>> authorized({"authorization": "Bearer s3cret"}, "s3cret")
    True
"""

from __future__ import annotations

import hmac
import html
import json
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["COOKIE", "Guard", "authorized", "login_page", "login_response", "safe_next"]

#: The cookie that carries the token for browsers.
COOKIE = "sonde_token"
_OPEN_PATHS = ("/login",)
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape"))


def authorized(headers: Mapping[str, str], token: str | None) -> bool:
    """Whether request ``headers`` (lower-case names) carry ``token`` as a bearer header or the cookie.

    Always True when ``token`` is None (no token configured). Use it to guard anything the
    middleware does not see, e.g. ``authorized(request.headers, request.app.state.token)``.
    """
    if token is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _same(given.strip(), token):
        return True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001  # a malformed Cookie header is simply no token
        return False
    return COOKIE in cookie and _same(cookie[COOKIE].value, token)


def safe_next(target: str | None) -> str:
    """A same-site path to go to after login (never an absolute URL elsewhere)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def login_page(next_path: str, wrong: bool) -> str:
    """The HTML form that asks for the token."""
    note = "<p style='color:#b00'>That token is not right.</p>" if wrong else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sonde: token</title></head>"
        "<body style='font-family:sans-serif;max-width:28em;margin:4em auto'>"
        "<h2>sonde</h2><p>This server needs its access token (<code>sonde serve --token</code> "
        "or <code>SONDE_TOKEN</code>).</p>" + note +
        "<form method='get' action='/login'><input type='password' name='token' autofocus "
        "placeholder='token' style='width:100%;padding:.4em'>"
        f"<input type='hidden' name='next' value='{html.escape(next_path, quote=True)}'>"
        "<p><button type='submit'>Open the dashboard</button></p></form></body></html>"
    )


async def _json(send: Send, status: int, error: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: token check (when configured) and request body size limit.

    Args:
        app: the wrapped ASGI app.
        token: the access token, or None for none (loopback only; ``sonde serve`` enforces that).
        max_body: largest request body in bytes.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path: str = scope.get("path", "")
        if self.token is not None and not path.startswith(_OPEN_PATHS) and not authorized(headers, self.token) \
                and not self._page_with_token(scope):
            await self._refuse(scope, receive, send, headers)
            return
        if scope["type"] == "http" and scope.get("method") in _BODY_METHODS:
            await self._limited(scope, receive, send, headers)
            return
        await self.app(scope, receive, send)

    def _page_with_token(self, scope: Scope) -> bool:
        """A dashboard page opened with ``?token=`` (a shared link); the page then keeps it in the cookie."""
        if self.token is None or scope.get("method") != "GET" or scope.get("path", "").startswith("/api/"):
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        return bool(given) and _same(given, self.token)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if scope["type"] == "websocket":
            await receive()  # the websocket.connect message
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "")
        if scope.get("method") == "GET" and not path.startswith("/api/") and "text/html" in headers.get("accept", ""):
            query = scope.get("query_string", b"").decode("latin-1")
            target = quote(path + (f"?{query}" if query else ""), safe="")
            location = f"/login?next={target}".encode("latin-1")
            await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
            return
        await _json(send, 401, "this server needs its token: send the header 'Authorization: Bearer <token>' "
                               "(the token given to sonde serve --token or SONDE_TOKEN)",
                    [(b"www-authenticate", b"Bearer")])

    async def _limited(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await _json(send, 413, f"request body of {int(declared)} bytes is over this server's limit of "
                                   f"{self.max_body} bytes; send smaller batches")
            return
        # Read the whole body here (it is bounded), so a chunked upload is held to the limit too.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _json(send, 413, f"request body is over this server's limit of {self.max_body} bytes; "
                                       "send smaller batches")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def login_response(query_string: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
    """Status and parts of the ``/login`` answer for a query string (used by the app's route)."""
    params = parse_qs(query_string.decode("latin-1"))
    given = params.get("token", [""])[0]
    target = safe_next(params.get("next", ["/"])[0])
    if token is None or (given and _same(given, token)):
        return 303, {"location": target, "cookie": given if token is not None else None}
    return (401 if given else 200), {"html": login_page(target, wrong=bool(given))}
