"""Record ingest: msgpack batches, idempotent by batch id.

Body (``Content-Type: application/msgpack``; any other type answers 415)::

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

from itertools import repeat
from typing import Any

import msgpack
import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from sonde.records import Record
from sonde.server.api.common import (
    MAX_NAME,
    MSGPACK_TYPES,
    RunName,
    fail,
    need_run,
    require_type,
    storable_text,
    store_of,
)
from sonde.store.engine import paused_gc

__all__ = ["MAX_MESSAGE", "decode_batch", "router"]

router = APIRouter(tags=["records"])

#: Largest step the store holds (a 32-bit signed integer column on PostgreSQL).
MAX_STEP = 2**31 - 1
#: Longest array value in one Record.
MAX_ARRAY = 1_000_000
#: Longest message (the optional 7th element of a row) in characters.
MAX_MESSAGE = 10_000

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


def _good_name(value: str, what: str) -> bool:
    if (not value and what != "layer") or len(value) > MAX_NAME or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(value: Any, what: str, index: int) -> str:
    if not isinstance(value, str) or (not value and what != "layer") or len(value) > MAX_NAME:
        fail(422, f"record {index}: {what} must be a string of at most {MAX_NAME} characters"
                  f"{'' if what == 'layer' else ' (not empty)'}; got {value!r:.80}")
    return storable_text(value, f"record {index}: {what}")


def _value(value: Any, index: int) -> float | np.ndarray:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            fail(422, f"record {index}: value {value} does not fit a float64")
    if isinstance(value, (list, tuple)) and len(value) <= MAX_ARRAY and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        try:
            return np.asarray(value, dtype=np.float64)
        except OverflowError:
            fail(422, f"record {index}: an array element does not fit a float64")
    fail(422, f"record {index}: value must be a number or a list of at most {MAX_ARRAY} numbers; got {value!r:.80}")


def _message(value: Any, index: int) -> str:
    if not isinstance(value, str) or len(value) > MAX_MESSAGE:
        fail(422, f"record {index}: message (the 7th element) must be a string of at most {MAX_MESSAGE} "
                  f"characters; got {value!r:.80}")
    return storable_text(value, f"record {index}: message")


def decode_batch(body: bytes, run: str) -> tuple[str, list[Record]]:
    """Check and decode one msgpack batch into its id and Records; a 4xx ``HTTPException`` when malformed."""
    with paused_gc():
        return _decode(body, run)


def _decode(body: bytes, run: str) -> tuple[str, list[Record]]:
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        fail(400, f"the body must be one msgpack map {{batch_id, records}}; it could not be decoded: {exc}")
    if not isinstance(payload, dict) or set(payload) != {"batch_id", "records"}:
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        fail(422, f"the body must be a msgpack map with exactly the keys batch_id and records; got {keys}")
    batch_id, items = payload["batch_id"], payload["records"]
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 200:
        fail(422, f"batch_id must be a string of 1 to 200 characters (a UUID); got {batch_id!r:.80}")
    storable_text(batch_id, "batch_id")
    if not isinstance(items, list):
        fail(422, f"records must be a list of [step, phase, layer, topic, metric, value]; got {type(items).__name__}")
    # Checked column by column with C-level maps (and names once per distinct name): a
    # 50,000-Record batch decodes in tens of milliseconds instead of being walked field by field.
    lengths = set(map(len, items)) if set(map(type, items)) <= {list} else {0}
    if not lengths <= {6, 7}:
        i, item = next((i, it) for i, it in enumerate(items) if not (isinstance(it, list) and len(it) in (6, 7)))
        fail(422, f"record {i} must be [step, phase, layer, topic, metric, value] or [..., value, message]; "
                  f"got {item!r:.80}")
    if not items:
        return batch_id, []
    notes: tuple[str, ...] | None = None
    if 7 in lengths:  # some Records carry a message (alerts): checked, and split off the six columns
        notes = tuple(_message(it[6], i) if len(it) == 7 else "" for i, it in enumerate(items))
        items = [it[:6] for it in items]
    steps, phases, layer_names, topics, metrics, values = zip(*items)
    if not (set(map(type, steps)) <= {int} and 0 <= min(steps) and max(steps) <= MAX_STEP):
        i, step = next((i, s) for i, s in enumerate(steps) if not (type(s) is int and 0 <= s <= MAX_STEP))
        fail(422, f"record {i}: step must be an integer from 0 to {MAX_STEP}; got {step!r:.40}")
    for what, column in (("phase", phases), ("layer", layer_names), ("topic", topics), ("metric", metrics)):
        if not set(map(type, column)) <= {str}:
            i = next(i for i, x in enumerate(column) if type(x) is not str)
            _name(column[i], what, i)  # fails, naming the record
        for name in set(column):
            if not _good_name(name, what):
                _name(name, what, column.index(name))  # fails, naming the first record that has it
    if not set(map(type, values)) <= {float}:
        values = tuple(_value(v, i) for i, v in enumerate(values))
    if notes is None:
        return batch_id, list(map(Record, repeat(run), steps, phases, layer_names, topics, metrics, values))
    return batch_id, list(map(Record, repeat(run), steps, phases, layer_names, topics, metrics, values, notes))


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
