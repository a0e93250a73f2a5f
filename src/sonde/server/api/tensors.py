"""The tensors route: ``POST /api/v1/runs/{run}/tensors`` queues shipped tensors for the evaluator.

The payload is :mod:`sonde.wire.tensors`' (safetensors; answers 202 ``{"accepted": n}``, 503 when
the evaluator's queue is full, 200 ``{"duplicate": true}`` for a batch id seen before); the
probe side that ships it is :class:`sonde.metrics.ServerMetric`. Every metric spec in a payload is
checked here (:func:`~sonde.metrics.server.metric_from_spec`: a registered metric, settings within
its bounds) before anything is queued. The frontend role forwards the body to the evaluator role.

The names the payload is made of are re-exported here for the server's readers.

Example:
    >>> import numpy as np
    >>> body = encode_payload("b1", [TensorItem(0, "train", "fc", "activations", np.ones((2, 3)), None,
    ...                                          [{"name": "mean", "kwargs": {}}])])
    >>> batch_id, items = decode_payload(body, metric_from_spec)
    >>> batch_id, items[0].layer, items[0].tensor.shape
    ('b1', 'fc', (2, 3))
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sonde.metrics.server import ServerMetric, metric_from_spec
from sonde.server.api.common import TENSOR_TYPES, RunName, check_text, require_type
from sonde.wire import AsyncWireClient, WireError, path
from sonde.wire.tensors import MARKS, Mark, TensorItem, decode_payload, encode_payload, shift_steps

__all__ = ["MARKS", "Mark", "ServerMetric", "TensorItem", "decode_payload", "encode_payload", "metric_from_spec",
           "router", "shift_steps"]


# -- the route -------------------------------------------------------------------------------------
router = APIRouter(tags=["tensors"])

_OPENAPI = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def _evaluator(app: Any) -> Any:
    """The app's evaluator: the evaluator role's own, or (role ``all``) the one ``create_app``'s
    ``app.state.evaluator_of`` starts on first use (the route does not import the evaluator, which
    serves this very route)."""
    evaluator = getattr(app.state, "evaluator", None)
    return evaluator if evaluator is not None else app.state.evaluator_of(app)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@router.post("/runs/{run}/tensors", status_code=202, openapi_extra=_OPENAPI)
async def ingest_tensors(run: RunName, request: Request) -> JSONResponse:
    """Queue shipped tensors for server-side metrics (safetensors); 202 at once, 503 when the queue is full."""
    require_type(request, TENSOR_TYPES, "a safetensors payload")
    body = await request.body()
    state = request.app.state
    forward_to = getattr(state, "evaluator_url", None) if getattr(state, "role", "all") != "evaluator" else None
    if forward_to:  # the frontend role: the evaluator process does the work
        return await _forward(forward_to, run, body, request)
    try:
        check_text(run, "run name")
    except ValueError as exc:
        return _error(400, str(exc))
    store = getattr(state, "store", None)
    if store is not None and not await run_in_threadpool(store.has_run, run):
        return _error(404, f"no run '{run}'; create it first with POST {path('run', run)}")
    try:
        batch_id, items = await run_in_threadpool(decode_payload, body, metric_from_spec)
    except WireError as exc:
        return _error(exc.status, str(exc))
    outcome = _evaluator(request.app).submit(run, batch_id, items)
    if outcome == "duplicate":
        return JSONResponse({"accepted": 0, "duplicate": True}, status_code=200)
    if outcome == "full":
        return _error(503, "the evaluator's queue is full; retry later", **{"Retry-After": "1"})
    return JSONResponse({"accepted": len(items), "duplicate": False}, status_code=202)


async def _forward(url: str, run: str, body: bytes, request: Request) -> JSONResponse:
    auth = request.headers.get("authorization")
    try:
        async with AsyncWireClient(url) as client:
            response = await client.send("tensors", run, body, headers={"Authorization": auth} if auth else None)
    except httpx.TransportError as exc:
        return _error(503, f"the evaluator at {url} is unreachable ({type(exc).__name__}); retry later",
                      **{"Retry-After": "1"})
    try:
        content = response.json()
    except ValueError:
        content = {"error": response.text[:300]}
    return JSONResponse(content, status_code=response.status_code)
