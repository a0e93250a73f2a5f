"""The server's guard: one ASGI middleware in front of the whole app (every role's app).

What it enforces, in this order:

* **Host.** A server bound to a loopback address without a token answers only requests whose
  ``Host`` names this machine (``localhost``, ``127.0.0.1``, ``[::1]``) or an allowed origin:
  a page of another site cannot reach it through a DNS name rebound to 127.0.0.1.
* **Cross-site writes.** A state-changing request (``POST``, ``PUT``, ``PATCH``, ``DELETE``)
  and a websocket handshake that carry an ``Origin`` header must come from the server's own
  origin (the ``Origin``'s host and port equal the request's ``Host``) or from one of
  ``allow_origins`` (``sonde serve --allow-origin``); others answer 403. Clients that send no
  ``Origin`` (the probe, curl, scripts) are not browsers and pass.
* **Token.** When the app has a token (``sonde serve --token`` or ``SONDE_TOKEN``), every request
  and websocket must carry it, as ``Authorization: Bearer <token>`` (API clients, remote probes)
  or as the ``sonde_token`` cookie (browsers). ``GET /login?token=<token>`` and any dashboard
  page opened with ``?token=<token>`` (a shared link) set the cookie and redirect (303) to the
  same address without the token. Without it, API paths answer 401 JSON and browser pages
  redirect to ``/login``, a small form that asks for the token. Tokens are compared in constant
  time.
* **Content type.** A write to the API whose ``Content-Type`` is one a page of any site may send
  without asking (``text/plain``, ``application/x-www-form-urlencoded``, ``multipart/form-data``)
  answers 415; the binary routes also name the one type they take (``application/msgpack`` for
  Records, ``application/octet-stream`` for tensors; see :func:`sonde.server.api.common.require_type`).
* **Size.** A request body above ``max_body`` bytes answers 413 JSON before any handler runs
  (checked on ``Content-Length`` and again while the body streams in).

Example:
    >>> app.add_middleware(Guard, token="s3cret", max_body=64 << 20)   # doctest: +SKIP
    >>> authorized({"authorization": "Bearer s3cret"}, "s3cret")
    True
    >>> same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"), same_origin("http://evil.test", "127.0.0.1:8080")
    (True, False)
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
from collections.abc import Iterable, Mapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sonde.errors import ConfigError

__all__ = ["COOKIE", "Guard", "authorized", "check_origins", "login_page", "login_response", "safe_next",
           "same_origin", "token_cookie"]

#: The cookie that carries the token for browsers.
COOKIE = "sonde_token"
_OPEN_PATHS = ("/login",)
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# The types a page of any site may send with no preflight (CORS-safelisted): never an API write.
_SIMPLE_TYPES = {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}


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


def token_cookie(token: str, *, secure: bool = False) -> str:
    """The ``Set-Cookie`` value that keeps ``token`` for a browser (HttpOnly, SameSite=Lax, path /).

    Lax, not Strict: a shared link opened from another site (a chat, a mail) then still carries
    the cookie on its top-level navigation; a page of another site still cannot send it with a
    write (those are refused by their ``Origin`` anyway). ``secure`` (served over HTTPS) adds ``Secure``.
    """
    cookie: SimpleCookie = SimpleCookie()
    cookie[COOKIE] = token
    cookie[COOKIE]["path"] = "/"
    cookie[COOKIE]["httponly"] = True
    cookie[COOKIE]["samesite"] = "Lax"
    if secure:
        cookie[COOKIE]["secure"] = True
    return cookie[COOKIE].OutputString()


def _netloc(origin: str) -> str | None:
    """``host[:port]`` of an origin (``scheme://host[:port]``), lower-case; None when it is none."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or "@" in parts.netloc:
        return None
    return parts.netloc.lower()


def same_origin(origin: str, host: str, allowed: Iterable[str] = ()) -> bool:
    """Whether a request's ``Origin`` header is the server's own (its host and port are ``host``) or allowed.

    ``host`` is the request's ``Host`` header; ``allowed`` the extra origins (``https://sonde.example``).
    The scheme is not compared: behind a TLS proxy the browser's ``https`` origin reaches the server
    as plain HTTP with the same ``Host``.
    """
    netloc = _netloc(origin)
    if netloc is None:  # "null" (a sandboxed frame, a file:// page) or garbage
        return False
    return netloc == host.strip().lower() or netloc in {_netloc(a) for a in allowed}


def check_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """``origins`` when each is ``http(s)://host[:port]`` (what a browser sends as ``Origin``), else ConfigError.

    Example:
        >>> check_origins(["https://sonde.example.com"])
        ('https://sonde.example.com',)
    """
    origins = tuple(origins)
    for origin in origins:
        if not isinstance(origin, str) or _netloc(origin) is None:
            raise ConfigError(f"an allowed origin is a scheme and a host, such as 'https://sonde.example.com' or "
                              f"'http://127.0.0.1:9000' (no path); got {origin!r}")
    return origins


def _loopback_name(host: str) -> bool:
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
    """ASGI middleware: host and origin checks, token (when configured), content type and body size.

    Args:
        app: the wrapped ASGI app.
        token: the access token, or None for none (loopback only; ``sonde serve`` enforces that).
        max_body: largest request body in bytes.
        allow_origins: origins besides the server's own that may write and open the websocket
            (``https://sonde.example.com``: the address a reverse proxy serves the dashboard at,
            when it does not pass the ``Host`` header on).
    """

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int, allow_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.allow_origins = check_origins(allow_origins)
        self._allowed_hosts = {n for n in map(_netloc, self.allow_origins) if n}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path: str = scope.get("path", "")
        method = scope.get("method")
        refusal = self._foreign(scope, headers)
        if refusal:
            await self._forbid(scope, receive, send, refusal)
            return
        if self.token is not None and method == "GET" and not path.startswith(("/api/", *_OPEN_PATHS)) \
                and self._token_link(scope):
            await self._clean_redirect(scope, send)
            return
        if self.token is not None and not path.startswith(_OPEN_PATHS) and not authorized(headers, self.token):
            await self._refuse(scope, receive, send, headers)
            return
        if scope["type"] == "http" and method in _BODY_METHODS:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if path.startswith("/api/") and kind in _SIMPLE_TYPES:
                await _json(send, 415, f"Content-Type {kind} is not taken by {method} {path}: the API takes "
                                       "application/json, and application/msgpack (Records) or "
                                       "application/octet-stream (tensors) on its binary routes")
                return
            await self._limited(scope, receive, send, headers)
            return
        await self.app(scope, receive, send)

    def _foreign(self, scope: Scope, headers: dict[str, str]) -> str:
        """Why a request from outside is refused: a rebound host name or a cross-site write ("" when it is not)."""
        host = headers.get("host", "")
        server = scope.get("server") or ("", 0)
        if self.token is None and _loopback_name(str(server[0])) and not _loopback_name(host or "localhost") \
                and host.strip().lower() not in self._allowed_hosts:
            return (f"Host {host!r} is not this machine: a server on a loopback address without a token answers "
                    "only localhost, 127.0.0.1 and [::1] (a page of another site may point its own name here); "
                    "give it a token (--token), or --allow-origin <the URL you open it at>")
        writes = scope["type"] == "websocket" or scope.get("method") in _BODY_METHODS
        origin = headers.get("origin")
        if writes and origin is not None and not same_origin(origin, host, self.allow_origins):
            return (f"cross-site request refused: Origin {origin[:100]!r} is not this server's origin (Host "
                    f"{host[:100]!r}); a page of another site may not change data here. Behind a reverse proxy, "
                    "pass the Host header on (nginx: proxy_set_header Host $host) or start sonde serve with "
                    "--allow-origin <the URL you open it at>")
        return ""

    async def _forbid(self, scope: Scope, receive: Receive, send: Send, reason: str) -> None:
        if scope["type"] == "websocket":
            await receive()  # the websocket.connect message
            await send({"type": "websocket.close", "code": 1008})  # before accept: the client sees 403
            return
        await _json(send, 403, reason)

    def _token_link(self, scope: Scope) -> bool:
        """A page opened with the right ``?token=`` (a shared link)."""
        assert self.token is not None
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        return bool(given) and _same(given, self.token)

    async def _clean_redirect(self, scope: Scope, send: Send) -> None:
        """Keep the link's token in the cookie and go to the same address without it.

        The page's scripts, styles and websocket then authenticate by cookie, and the token
        leaves the address bar, the history and the ``Referer`` of what the page loads.
        """
        assert self.token is not None
        rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
                if k != "token"]
        raw = scope.get("raw_path") or quote(scope.get("path", "/")).encode("latin-1")
        path = "/" + raw.decode("latin-1").lstrip("/")  # never "//host": that would leave the site
        location = path + (f"?{urlencode(rest)}" if rest else "")
        secure = scope.get("scheme") in ("https", "wss")
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location.encode("latin-1")),
            (b"set-cookie", token_cookie(self.token, secure=secure).encode("latin-1")),
            (b"cache-control", b"no-store"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if scope["type"] == "websocket":
            await receive()  # the websocket.connect message
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "")
        if scope.get("method") == "GET" and not path.startswith("/api/") and "text/html" in headers.get("accept", ""):
            # Where to go after the login form: this address, less a wrong ?token= it may carry.
            rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                 keep_blank_values=True) if k != "token"]
            target = quote(path + (f"?{urlencode(rest)}" if rest else ""), safe="")
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
