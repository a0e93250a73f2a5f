"""Record ingest: msgpack batches, idempotent by batch id.

The codec is :mod:`sonde.wire.records`; this route checks the Content-Type and stores. Body
(``Content-Type: application/msgpack``; any other type answers 415)::

    {"batch_id": "<uuid>", "records": [[step, phase, layer, topic, metric, value], ...]}

``value`` is a number or a list of numbers (a histogram, a spectrum). A row may carry a 7th
element, the Record's ``message`` (a string: what an ``alert`` says is wrong); it is stored
beside the Record exactly as a local store keeps it (``Store.load(..., messages=True)``), and a
6-element row has none. A batch is stored whole or not at all; replaying a stored batch id
answers 200 with ``"duplicate": true`` and stores nothing.

Example:
    >>> rows = [[0, "train", "fc1", "weights", "norm", 1.5],
    ...         [0, "train", "fc1", "activations", "alert", 1.0, "layer 'fc1': 97% dead"]]
    >>> body = msgpack.packb({"batch_id": "b1", "records": rows})                    # doctest: +SKIP
    >>> client.post("/api/v1/runs/mlp/records", content=body,
    ...             headers={"content-type": "application/msgpack"}).json()           # doctest: +SKIP
    {'accepted': 2, 'duplicate': False}
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from sonde.records import Record
from sonde.server.api.common import MSGPACK_TYPES, RunName, fail, need_run, require_type, store_of
from sonde.store.engine import paused_gc
from sonde.wire.errors import WireError
from sonde.wire.records import MAX_ARRAY, MAX_MESSAGE, MAX_STEP, decode_records

__all__ = ["MAX_ARRAY", "MAX_MESSAGE", "MAX_STEP", "decode_batch", "router"]

router = APIRouter(tags=["records"])

_SCHEMA = {
    "type": "object",
    "required": ["batch_id", "records"],
    "properties": {
        "batch_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "records": {
            "type": "array",
            "items": {
                "type": "array", "minItems": 6, "maxItems": 7,
                "description": "[step, phase, layer, topic, metric, value] or, for a Record that carries a "
                               "message (an alert's text), [step, phase, layer, topic, metric, value, message]",
                "prefixItems": [
                    {"type": "integer", "minimum": 0, "maximum": MAX_STEP},
                    {"type": "string"}, {"type": "string"}, {"type": "string"}, {"type": "string"},
                    {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]},
                    {"type": "string", "maxLength": MAX_MESSAGE},
                ],
            },
        },
    },
}


def decode_batch(body: bytes, run: str) -> tuple[str, list[Record]]:
    """Check and decode one msgpack batch into its id and Records; a 4xx ``HTTPException`` when malformed."""
    with paused_gc():
        try:
            return decode_records(body, run)
        except WireError as exc:
            fail(exc.status, str(exc))


@router.post(
    "/runs/{run}/records",
    openapi_extra={"requestBody": {"required": True, "content": {"application/msgpack": {"schema": _SCHEMA}}}},
)
async def ingest_records(run: RunName, request: Request) -> dict[str, Any]:
    """Store one batch of Records (msgpack); a replayed ``batch_id`` stores nothing and says ``duplicate``.

    Each row is ``[step, phase, layer, topic, metric, value]``, or ``[..., value, message]`` for a
    Record with a readable text (an ``alert``); the message is stored beside the Record.
    """
    require_type(request, MSGPACK_TYPES, "a batch of Records")
    store = store_of(request)
    await run_in_threadpool(need_run, store, run)
    batch_id, batch = await run_in_threadpool(decode_batch, await request.body(), run)
    stored = await run_in_threadpool(store.write_batch, run, batch_id, batch)
    return {"accepted": len(batch) if stored else 0, "duplicate": not stored}
