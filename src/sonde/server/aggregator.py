"""The aggregator role: takes Records from probes, hands whole steps to the frontend.

Probes (one per process, or one per pipeline stage of a model) POST their batches here with
the frontend's records API. The aggregator splits each batch by step and gathers the pieces of
one step of one run into a *group*; a group goes to the frontend as one batch when it has every
(phase, layer, topic, metric) the run's previous step had, when a later step of the run
arrives, when it is large, or ``group_delay`` seconds after it opened. The probe's request is
answered after the frontend stored its pieces (503 if it could not), so an answer always means
stored, and a probe that gets no answer replays its batch.

Idempotent end to end: the group's batch id is derived from its pieces' batch ids and steps
(uuid5), so the frontend stores a re-sent group once; a piece of a group that failed is
re-sent with that same group, and a batch id already forwarded answers ``duplicate``.
Records keep their ``message`` (the optional 7th element of a row, an alert's text) on the way
through. Run creation, finish, graphs and reads are passed through to the frontend; tensors to the
evaluator (``evaluator_url``) or, without one, to the frontend.

Example:
    >>> app = create_aggregator_app("http://127.0.0.1:8080")     # doctest: +SKIP
    >>> uvicorn.run(app, port=8082)                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sonde.records import Record
from sonde.server.api.common import MSGPACK_TYPES, check_text, require_type
from sonde.server.api.records import decode_batch
from sonde.server.api.security import Guard
from sonde.server.evaluator import install_json_errors
from sonde.wire.client import AsyncWireClient
from sonde.wire.records import encode_records
from sonde.wire.retry import retryable
from sonde.wire.routes import PREFIX

__all__ = ["Aggregator", "ForwardError", "create_aggregator_app", "group_id"]

_NAMESPACE = uuid.UUID("0c1d5e4b-8f8a-4d55-a3a1-6f0b5d7e2c90")
_REMEMBERED = 100_000


def group_id(run: str, step: int, batch_ids: list[str]) -> str:
    """The frontend batch id of a group: the same pieces give the same id, whatever the timing."""
    return str(uuid.uuid5(_NAMESPACE, "\n".join([run, str(step), *sorted(batch_ids)])))


class ForwardError(Exception):
    """The frontend did not store a group; ``status`` is what the probe is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Group:
    run: str
    step: int
    future: asyncio.Future[None]
    pieces: list[tuple[str, list[Record]]] = field(default_factory=list)
    keys: set[tuple[str, str, str, str]] = field(default_factory=set)
    count: int = 0
    timer: asyncio.TimerHandle | None = None


class Aggregator:
    """Groups Records by (run, step) and forwards each group to the frontend once.

    All methods run on the server's event loop.

    Args:
        frontend_url: base URL of the frontend (or ``all``) role.
        token: bearer token for the frontend.
        group_delay: longest a group waits for more pieces.
        max_group_records: a group this large goes at once.
    """

    def __init__(self, frontend_url: str, *, token: str | None = None, group_delay: float = 0.2,
                 max_group_records: int = 200_000, client: httpx.AsyncClient | None = None) -> None:
        self.frontend_url = frontend_url.rstrip("/")
        self.token = token
        self.group_delay = group_delay
        self.max_group_records = max_group_records
        self.client = client
        self._wire: AsyncWireClient | None = None
        self.forwarded = 0
        self._groups: dict[tuple[str, int], _Group] = {}
        self._shape: dict[str, frozenset[tuple[str, str, str, str]]] = {}
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pending: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._failed: OrderedDict[tuple[str, str, int], tuple[str, str, bytes]] = OrderedDict()
        self._tasks: set[asyncio.Future[None]] = set()

    def _client(self) -> AsyncWireClient:
        if self._wire is None:
            self._wire = AsyncWireClient(self.frontend_url, token=self.token, timeout=30.0, client=self.client)
            self.client = self._wire.http
        return self._wire

    async def ingest(self, run: str, batch_id: str, records: list[Record]) -> dict[str, Any]:
        """Group one incoming batch; returns once the frontend stored all of it (ForwardError if not)."""
        incoming = (run, batch_id)
        if incoming in self._done:
            return {"accepted": 0, "duplicate": True}
        if incoming in self._pending:  # the probe retried while its first attempt still waits
            await asyncio.gather(*self._pending[incoming])
            return {"accepted": 0, "duplicate": True}
        by_step: dict[int, list[Record]] = {}
        for record in records:
            by_step.setdefault(record.step, []).append(record)
        waits: list[asyncio.Future[None]] = []
        for step, piece in by_step.items():
            failed = self._failed.get((run, batch_id, step))
            if failed is not None:  # re-send the very group it was part of: same id, stored once
                waits.append(asyncio.ensure_future(self._forward_retry(*failed)))
            else:
                waits.append(self._add(run, step, batch_id, piece))
        if by_step:
            latest = max(by_step)
            for group in [g for g in self._groups.values() if g.run == run and g.step < latest]:
                self._close(group)
        self._pending[incoming] = waits
        try:
            await asyncio.gather(*waits)
        finally:
            del self._pending[incoming]
        self._done[incoming] = None
        while len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)
        return {"accepted": len(records), "duplicate": False}

    def _add(self, run: str, step: int, batch_id: str, piece: list[Record]) -> asyncio.Future[None]:
        group = self._groups.get((run, step))
        if group is None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            future.add_done_callback(lambda f: None if f.cancelled() else f.exception())  # retrieved: no warning
            group = self._groups[(run, step)] = _Group(run, step, future)
            group.timer = loop.call_later(self.group_delay, self._close, group)
        group.pieces.append((batch_id, piece))
        group.keys.update((r.phase, r.layer, r.topic, r.metric) for r in piece)
        group.count += len(piece)
        shape = self._shape.get(run)
        if group.count >= self.max_group_records or (shape and group.keys >= shape):
            self._close(group)
        return group.future

    def _close(self, group: _Group) -> None:
        if self._groups.get((group.run, group.step)) is not group:
            return  # already on its way
        del self._groups[(group.run, group.step)]
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.ensure_future(self._send(group))
        self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _send(self, group: _Group) -> None:
        gid = group_id(group.run, group.step, [b for b, _ in group.pieces])
        body = encode_records(gid, [r for _, piece in group.pieces for r in piece])
        try:
            await self._post(group.run, body)
        except ForwardError as exc:
            for batch_id, _ in group.pieces:
                self._failed[(group.run, batch_id, group.step)] = (gid, group.run, body)
            while len(self._failed) > _REMEMBERED:
                self._failed.popitem(last=False)
            group.future.set_exception(exc)
            return
        if any(phase == "train" for phase, *_ in group.keys):
            self._shape[group.run] = frozenset(group.keys)
        group.future.set_result(None)

    async def _forward_retry(self, gid: str, run: str, body: bytes) -> None:
        await self._post(run, body)
        for key in [k for k, v in self._failed.items() if v[0] == gid]:
            del self._failed[key]

    async def _post(self, run: str, body: bytes) -> None:
        try:
            response = await self._client().send("records", run, body)
        except httpx.TransportError as exc:
            raise ForwardError(503, f"the frontend at {self.frontend_url} is unreachable "
                                    f"({type(exc).__name__}); retry later") from exc
        if response.status_code >= 300:
            raise ForwardError(503 if retryable(response.status_code) else response.status_code,
                               f"the frontend at {self.frontend_url} answered {response.status_code}: "
                               f"{response.text[:300]}")
        self.forwarded += 1

    async def flush_run(self, run: str) -> None:
        """Send every open group of ``run`` now and wait for them (before the run's finish goes through)."""
        groups = [g for g in self._groups.values() if g.run == run]
        for group in groups:
            self._close(group)
        await asyncio.gather(*(g.future for g in groups), return_exceptions=True)

    async def close(self) -> None:
        for run in {g.run for g in self._groups.values()}:
            await self.flush_run(run)
        if self.client is not None:
            await self.client.aclose()


def create_aggregator_app(frontend_url: str, *, token: str | None = None, evaluator_url: str | None = None,
                          group_delay: float = 0.2, max_body: int = 64 << 20) -> FastAPI:
    """The app of the ``aggregator`` role (port 8082): the probes' API, in front of the frontend.

    Example:
        >>> create_aggregator_app("http://127.0.0.1:8080", evaluator_url="http://127.0.0.1:8081")  # doctest: +SKIP
    """
    aggregator = Aggregator(frontend_url, token=token, group_delay=group_delay)
    tensors_to = (evaluator_url or frontend_url).rstrip("/")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await aggregator.close()

    app = FastAPI(title="sonde aggregator", version="1", lifespan=lifespan)
    app.state.role, app.state.token, app.state.aggregator = "aggregator", token, aggregator

    @app.post(PREFIX + "/runs/{run}/records", openapi_extra={"requestBody": {"required": True, "content": {
        "application/msgpack": {"schema": {"type": "string", "format": "binary"}}}}})
    async def records(run: str, request: Request) -> Response:
        """Take a batch of Records (the frontend's format, 6- or 7-element rows); answered once stored."""
        require_type(request, MSGPACK_TYPES, "a batch of Records")
        try:
            check_text(run, "run name")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        batch_id, batch = await run_in_threadpool(decode_batch, await request.body(), run)
        try:
            return JSONResponse(await aggregator.ingest(run, batch_id, batch))
        except ForwardError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status,
                                headers={"Retry-After": "1"} if exc.status == 503 else None)

    @app.post(PREFIX + "/runs/{run}/finish")
    async def finish(run: str, request: Request) -> Response:
        """Send the run's open groups, then pass the finish on."""
        await aggregator.flush_run(run)
        return await _proxy(aggregator, frontend_url, request)

    @app.post(PREFIX + "/runs/{run}/tensors")
    async def tensors(run: str, request: Request) -> Response:
        """Pass shipped tensors on to the evaluator (or the frontend without one)."""
        return await _proxy(aggregator, tensors_to, request)

    @app.api_route(PREFIX + "/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def passthrough(path: str, request: Request) -> Response:
        """Everything else (run creation, graphs, reads) goes to the frontend as is."""
        return await _proxy(aggregator, frontend_url, request)

    install_json_errors(app)
    app.add_middleware(Guard, token=token, max_body=max_body)
    return app


async def _proxy(aggregator: Aggregator, base: str, request: Request) -> Response:
    url = base.rstrip("/") + request.url.path
    try:
        response = await aggregator._client().relay(
            request.method, url, await request.body(), params=request.query_params,
            content_type=request.headers.get("content-type", "application/octet-stream"))
    except httpx.TransportError as exc:
        return JSONResponse({"error": f"{base} is unreachable ({type(exc).__name__}); retry later"},
                            status_code=503, headers={"Retry-After": "1"})
    return Response(response.content, status_code=response.status_code,
                    media_type=response.headers.get("content-type"))
