"""The tensors codec: shipped tensors as the safetensors body of ``POST /api/v1/runs/{run}/tensors``.

Payload (answered 202 ``{"accepted": n}``, 503 when the evaluator's queue is full, 200
``{"duplicate": true}`` for a batch id seen before)::

    tensors  t0, t1, ...        the captured tensors (float32), any shape
             l0, ...            optional int64 labels of the rows of t<i>
    metadata {"batch_id": "<uuid>", "items": "[{\\"tensor\\": \\"t0\\", \\"labels\\": \\"l0\\" | null,
              \\"step\\": 3, \\"phase\\": \\"train\\", \\"layer\\": \\"fc1\\", \\"topic\\": \\"activations\\",
              \\"metrics\\": [{\\"name\\": \\"histogram\\", \\"kwargs\\": {\\"bins\\": 32}}]}, ...]"}

An item may instead be a mark, ``{"mark": "epoch_end" | "run_end", "metrics": [...]}``: the
probe reached the end of an epoch (``Probe.end_epoch()``) or of the run (the probe closed).
The evaluator handles it after every item sent before it, for the listed metrics of the run.

Example:
    >>> import numpy as np
    >>> body = encode_payload("b1", [TensorItem(0, "train", "fc", "activations", np.ones((2, 3)), None,
    ...                                          [{"name": "mean", "kwargs": {}}])])
    >>> batch_id, items = decode_payload(shift_steps(body, 4))
    >>> batch_id, items[0].layer, items[0].tensor.shape, items[0].step
    ('b1', 'fc', (2, 3), 4)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from sonde.wire.errors import WireError
from sonde.wire.records import MAX_STEP
from sonde.wire.routes import MAX_NAME, check_text

__all__ = ["MARKS", "MAX_ITEMS", "MAX_SPECS", "Mark", "TensorItem", "decode_payload", "encode_payload",
           "shift_steps"]

#: Most items (tensors) in one payload.
MAX_ITEMS = 10_000
#: Most metric specs one item may list.
MAX_SPECS = 64
#: The marks a payload item may carry, by the boundary (``Metric.boundary``) they announce.
MARKS = {"epoch": "epoch_end", "run": "run_end"}

#: Checks one metric spec ``{"name": ..., "kwargs": {...}}``; raises ValueError saying what is wrong.
SpecCheck = Callable[[Any], object]


@dataclass
class TensorItem:
    """One shipped tensor: where it was captured, its rows' labels, and the metrics to run on it."""

    step: int
    phase: str
    layer: str
    topic: str
    tensor: np.ndarray
    labels: np.ndarray | None
    metrics: list[dict[str, Any]]
    layer_type: str = ""  # the module's class name: some metrics read features by layer kind


@dataclass
class Mark:
    """A boundary of the run (``"epoch_end"`` or ``"run_end"``) for the metrics ``metrics`` describe."""

    kind: str
    metrics: list[dict[str, Any]]


def encode_payload(batch_id: str, items: Sequence[TensorItem | Mark]) -> bytes:
    """The safetensors body of ``POST /api/v1/runs/{run}/tensors``."""
    arrays: dict[str, np.ndarray] = {}
    meta: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, Mark):
            meta.append({"mark": item.kind, "metrics": item.metrics})
            continue
        arrays[f"t{i}"] = np.ascontiguousarray(item.tensor, dtype=np.float32)
        labels = None
        if item.labels is not None:
            labels = f"l{i}"
            arrays[labels] = np.ascontiguousarray(item.labels, dtype=np.int64)
        meta.append({"tensor": f"t{i}", "labels": labels, "step": int(item.step), "phase": item.phase,
                     "layer": item.layer, "topic": item.topic, "metrics": item.metrics,
                     "layer_type": item.layer_type})
    return st_save(arrays, metadata={"batch_id": batch_id, "items": json.dumps(meta)})


def _header(body: bytes) -> dict[str, Any]:
    if len(body) < 8:
        raise ValueError(f"a safetensors body starts with an 8-byte header length; got {len(body)} bytes")
    (size,) = struct.unpack("<Q", body[:8])
    if size > len(body) - 8:
        raise ValueError(f"the safetensors header says {size} bytes but the body has {len(body) - 8}")
    header = json.loads(body[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the safetensors header must be a JSON object")
    return header


def _text(value: str, what: str) -> str:
    try:
        return check_text(value, what)
    except ValueError as exc:
        raise WireError(422, str(exc)) from None


def decode_payload(body: bytes, check_spec: SpecCheck | None = None) -> tuple[str, list[TensorItem | Mark]]:
    """Check and decode a tensors payload; :class:`~sonde.wire.errors.WireError` (a ValueError) saying what is
    wrong: 400 for a body that is no safetensors file, 422 for one whose content breaks the protocol.

    ``check_spec`` checks each metric spec beyond its shape (the server: a registered metric, settings
    within its bounds); a spec it rejects makes the payload a 422.
    """
    try:
        meta = _header(body).get("__metadata__") or {}
        arrays = st_load(body)
    except (ValueError, SafetensorError, UnicodeDecodeError) as exc:
        raise WireError(400, f"the body must be a safetensors file; it could not be read: {exc}") from exc
    batch_id = meta.get("batch_id")
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 200:
        raise WireError(422, f"metadata batch_id must be a string of 1 to 200 characters; got {batch_id!r:.80}")
    _text(batch_id, "batch_id")
    try:
        listed = json.loads(meta.get("items", ""))
    except ValueError as exc:
        raise WireError(422, f"metadata items must be a JSON list of items; {exc}") from exc
    if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_ITEMS:
        raise WireError(422, f"metadata items must be a JSON list of 1 to {MAX_ITEMS} items")
    items: list[TensorItem | Mark] = []
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise WireError(422, f"item {i} must be an object; got {entry!r:.80}")
        if "mark" in entry:
            items.append(_decode_mark(i, entry, check_spec))
            continue
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            raise WireError(422, f"item {i}: step must be an integer from 0 to {MAX_STEP}; got {step!r:.40}")
        names = {}
        for key in ("phase", "layer", "topic", "layer_type"):
            value = entry.get(key, "") if key == "layer_type" else entry.get(key)
            if not isinstance(value, str) or len(value) > MAX_NAME or (not value and key in ("phase", "topic")):
                raise WireError(422, f"item {i}: {key} must be a string of at most {MAX_NAME} characters; "
                                     f"got {value!r:.80}")
            names[key] = _text(value, f"item {i}: {key}")
        tensor = arrays.get(str(entry.get("tensor")))
        if tensor is None:
            raise WireError(422, f"item {i}: tensor {entry.get('tensor')!r:.80} is not in the body")
        labels = None
        if entry.get("labels") is not None:
            labels = arrays.get(str(entry["labels"]))
            if labels is None or labels.ndim != 1 or tensor.ndim == 0 or len(labels) != tensor.shape[0]:
                raise WireError(422, f"item {i}: labels must be a 1-D tensor with one label per row of the tensor")
        items.append(TensorItem(step, names["phase"], names["layer"], names["topic"], tensor, labels,
                                _decode_specs(i, entry, check_spec), names["layer_type"]))
    return batch_id, items


def _decode_specs(i: int, entry: dict[str, Any], check_spec: SpecCheck | None) -> list[dict[str, Any]]:
    specs = entry.get("metrics")
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_SPECS:
        raise WireError(422, f"item {i}: metrics must be a list of 1 to {MAX_SPECS} {{name, kwargs}}; "
                             f"got {specs!r:.80}")
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(
                spec.get("kwargs", {}), dict):
            raise WireError(422, f"item {i}: a metric spec is {{\"name\": str, \"kwargs\": object}}; "
                                 f"got {spec!r:.80}")
        if check_spec is not None:
            try:
                check_spec(spec)  # unknown names, bad or out-of-bound arguments
            except ValueError as exc:
                raise WireError(422, f"item {i}: {exc}") from None
    return specs


def _decode_mark(i: int, entry: dict[str, Any], check_spec: SpecCheck | None) -> Mark:
    kind = entry["mark"]
    if kind not in MARKS.values():
        raise WireError(422, f"item {i}: mark must be one of {', '.join(map(repr, MARKS.values()))}; "
                             f"got {kind!r:.40}")
    return Mark(kind, _decode_specs(i, entry, check_spec))


def shift_steps(body: bytes, offset: int) -> bytes:
    """The payload with every step moved by ``offset`` (a resumed run created while the server was away)."""
    batch_id, items = decode_payload(body)
    for item in items:
        if isinstance(item, TensorItem):
            item.step += offset
    return encode_payload(batch_id, items)
