"""The one HTTP client of the protocol, in a blocking and an asyncio flavour.

:class:`WireClient` is what the remote sink's outbox and the evaluator's writer send with;
:class:`AsyncWireClient` what the aggregator and the frontend (forwarding tensors to the
evaluator role) send with. Both send a request by its kind (:data:`~sonde.wire.routes.ROUTES`:
method, path and Content-Type come from there), carry the bearer token, and leave retrying to the
caller, who reads :mod:`sonde.wire.retry`.

Example:
    >>> client = WireClient("http://127.0.0.1:8080", token="s3cret")
    >>> client.http.headers["authorization"]
    'Bearer s3cret'
    >>> client.close()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from sonde.wire.routes import ROUTES, path

__all__ = ["AsyncWireClient", "WireClient", "auth_headers", "normal_url"]


def normal_url(url: str) -> str:
    """``url`` without a trailing slash: one spelling per server (spill sessions are matched by it)."""
    return url.rstrip("/")


def auth_headers(token: str | None) -> dict[str, str]:
    """The bearer header of ``token``; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _request_headers(kind: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    return {"Content-Type": ROUTES[kind][2], **(extra or {})}


class WireClient:
    """Blocking requests to one server.

    Args:
        server: base URL of ``sonde serve`` (any role that takes the requests sent).
        token: bearer token sent with every request.
        timeout: seconds for one request; connecting gets at most ``connect_timeout``.
        client: an ``httpx.Client`` to send with (tests pass one bound to an in-process app); it
            stays open for its owner at :meth:`close`.
    """

    def __init__(self, server: str, *, token: str | None = None, timeout: float = 10.0,
                 connect_timeout: float = 3.0, client: httpx.Client | None = None) -> None:
        self.server = normal_url(server)
        self._own = client is None
        self.http = client or httpx.Client(base_url=self.server, headers=auth_headers(token),
                                           timeout=httpx.Timeout(timeout, connect=min(timeout, connect_timeout)))
        if client is not None and token:
            self.http.headers.update(auth_headers(token))

    def send(self, kind: str, run: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Send request ``kind`` of ``run`` (``httpx.TransportError`` when the server cannot be reached)."""
        return self.http.request(ROUTES[kind][0], path(kind, run), content=body,
                                 headers=_request_headers(kind, headers))

    def close(self) -> None:
        if self._own:
            self.http.close()


class AsyncWireClient:
    """The asyncio twin of :class:`WireClient`, plus :meth:`relay` for a proxy's passthrough."""

    def __init__(self, server: str, *, token: str | None = None, timeout: float = 30.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.server = normal_url(server)
        self._own = client is None
        self.http = client or httpx.AsyncClient(base_url=self.server, headers=auth_headers(token), timeout=timeout)
        if client is not None and token:
            self.http.headers.update(auth_headers(token))

    async def send(self, kind: str, run: str, body: bytes, *,
                   headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Send request ``kind`` of ``run``."""
        return await self.http.request(ROUTES[kind][0], path(kind, run), content=body,
                                       headers=_request_headers(kind, headers))

    async def relay(self, method: str, url: str, body: bytes, *, content_type: str,
                    params: Any = None, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Pass a request through as it came (a proxy's routes other than the protocol's own)."""
        return await self.http.request(method, url, content=body, params=params,
                                       headers={"Content-Type": content_type, **(headers or {})})

    async def close(self) -> None:
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncWireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
