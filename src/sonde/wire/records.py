"""The Records codec: a batch of Records as the msgpack body of ``POST /api/v1/runs/{run}/records``.

Body (``Content-Type: application/msgpack``)::

    {"batch_id": "<uuid>", "records": [[step, phase, layer, topic, metric, value], ...]}

``value`` is a number or a list of numbers (a histogram, a spectrum). A row may carry a 7th
element, the Record's ``message`` (a string: what an ``alert`` says is wrong); a 6-element row
has none. :func:`encode_records` writes a body, :func:`decode_records` checks and reads one
(a :class:`~sonde.wire.errors.WireError` with the HTTP status when it is malformed) and
:func:`shift_records` moves its steps (a resumed run whose first step the server told later).

Example:
    >>> body = encode_records("b1", [Record("r", 0, "train", "fc", "weights", "norm", 1.5)])
    >>> batch_id, records = decode_records(shift_records(body, 10), "r")
    >>> batch_id, records[0].step, records[0].value
    ('b1', 10, 1.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Any, NoReturn

import msgpack
import numpy as np

from sonde.records import Record
from sonde.wire.errors import WireError
from sonde.wire.routes import MAX_NAME, check_text

__all__ = ["MAX_ARRAY", "MAX_MESSAGE", "MAX_STEP", "decode_records", "encode_records", "shift_records"]

#: Largest step the store holds (a 32-bit signed integer column on PostgreSQL).
MAX_STEP = 2**31 - 1
#: Longest array value in one Record.
MAX_ARRAY = 1_000_000
#: Longest message (the optional 7th element of a row) in characters.
MAX_MESSAGE = 10_000


def encode_records(batch_id: str, records: Sequence[Record], step_offset: int = 0) -> bytes:
    """The msgpack body of ``POST /api/v1/runs/{run}/records``.

    A Record with a ``message`` (an alert's text) is sent as a 7-element row, the message last;
    every other Record as the 6-element row ``[step, phase, layer, topic, metric, value]``.

    Example:
        >>> body = encode_records("b1", [Record("r", 0, "train", "fc", "weights", "norm", 1.5),
        ...                              Record("r", 0, "train", "fc", "activations", "alert", 1.0, "dead")])
        >>> msgpack.unpackb(body)["records"]
        [[0, 'train', 'fc', 'weights', 'norm', 1.5], [0, 'train', 'fc', 'activations', 'alert', 1.0, 'dead']]
    """
    rows = []
    for r in records:
        value = r.value
        plain: float | list[float] = (
            np.asarray(value, dtype=np.float64).ravel().tolist() if isinstance(value, np.ndarray) else float(value)
        )
        row = [int(r.step) + step_offset, r.phase, r.layer, r.topic, r.metric, plain]
        if r.message:
            row.append(str(r.message))
        rows.append(row)
    return msgpack.packb({"batch_id": batch_id, "records": rows}, use_bin_type=True)


def shift_records(body: bytes, offset: int) -> bytes:
    """The batch with every step moved by ``offset`` (a resumed run created while the server was away)."""
    payload = msgpack.unpackb(body, raw=False)
    for row in payload["records"]:
        row[0] += offset
    return msgpack.packb(payload, use_bin_type=True)


def _fail(status: int, message: str) -> NoReturn:
    raise WireError(status, message)


def _text(value: str, what: str) -> str:
    try:
        return check_text(value, what)
    except ValueError as exc:
        _fail(422, str(exc))


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
        _fail(422, f"record {index}: {what} must be a string of at most {MAX_NAME} characters"
                   f"{'' if what == 'layer' else ' (not empty)'}; got {value!r:.80}")
    return _text(value, f"record {index}: {what}")


def _value(value: Any, index: int) -> float | np.ndarray:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            _fail(422, f"record {index}: value {value} does not fit a float64")
    if isinstance(value, (list, tuple)) and len(value) <= MAX_ARRAY and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        try:
            return np.asarray(value, dtype=np.float64)
        except OverflowError:
            _fail(422, f"record {index}: an array element does not fit a float64")
    _fail(422, f"record {index}: value must be a number or a list of at most {MAX_ARRAY} numbers; got {value!r:.80}")


def _message(value: Any, index: int) -> str:
    if not isinstance(value, str) or len(value) > MAX_MESSAGE:
        _fail(422, f"record {index}: message (the 7th element) must be a string of at most {MAX_MESSAGE} "
                   f"characters; got {value!r:.80}")
    return _text(value, f"record {index}: message")


def decode_records(body: bytes, run: str) -> tuple[str, list[Record]]:
    """Check and decode one msgpack batch of ``run`` into its id and Records; WireError when malformed."""
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        _fail(400, f"the body must be one msgpack map {{batch_id, records}}; it could not be decoded: {exc}")
    if not isinstance(payload, dict) or set(payload) != {"batch_id", "records"}:
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        _fail(422, f"the body must be a msgpack map with exactly the keys batch_id and records; got {keys}")
    batch_id, items = payload["batch_id"], payload["records"]
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 200:
        _fail(422, f"batch_id must be a string of 1 to 200 characters (a UUID); got {batch_id!r:.80}")
    _text(batch_id, "batch_id")
    if not isinstance(items, list):
        _fail(422, f"records must be a list of [step, phase, layer, topic, metric, value]; got {type(items).__name__}")
    # Checked column by column with C-level maps (and names once per distinct name): a
    # 50,000-Record batch decodes in tens of milliseconds instead of being walked field by field.
    lengths = set(map(len, items)) if set(map(type, items)) <= {list} else {0}
    if not lengths <= {6, 7}:
        i, item = next((i, it) for i, it in enumerate(items) if not (isinstance(it, list) and len(it) in (6, 7)))
        _fail(422, f"record {i} must be [step, phase, layer, topic, metric, value] or [..., value, message]; "
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
        _fail(422, f"record {i}: step must be an integer from 0 to {MAX_STEP}; got {step!r:.40}")
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
