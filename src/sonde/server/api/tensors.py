"""Tensors for server-side metrics: the payload, the probe-side :class:`ServerMetric`, the ingest route.

A probe moves any registered metric off the training process by wrapping it::

    sonde.probe(model, server="http://127.0.0.1:8080",
                metrics=["mean", ServerMetric("histogram", bins=32, sample=256)])

On the probe, :class:`ServerMetric` only copies (the first ``sample`` rows of) each captured
tensor; at the end of the step the copy is shipped by the remote sink. The server's evaluator
runs the very same metric class on it (``update`` with a Capture, then ``compute``) and stores
the Records under the run, exactly as if computed in process.

Payload of ``POST /api/v1/runs/{run}/tensors`` (safetensors; answers 202 ``{"accepted": n}``,
503 when the evaluator's queue is full, 200 ``{"duplicate": true}`` for a batch id seen before)::

    tensors  t0, t1, ...        the captured tensors (float32), any shape
             l0, ...            optional int64 labels of the rows of t<i>
    metadata {"batch_id": "<uuid>", "items": "[{\\"tensor\\": \\"t0\\", \\"labels\\": \\"l0\\" | null,
              \\"step\\": 3, \\"phase\\": \\"train\\", \\"layer\\": \\"fc1\\", \\"topic\\": \\"activations\\",
              \\"metrics\\": [{\\"name\\": \\"histogram\\", \\"kwargs\\": {\\"bins\\": 32}}]}, ...]"}

An item may instead be a mark, ``{"mark": "epoch_end" | "run_end", "metrics": [...]}``: the
probe reached the end of an epoch (``Probe.end_epoch()``) or of the run (the probe closed).
The evaluator handles it after every item sent before it, for the listed metrics of the run:
at an epoch's end those with ``reset="epoch"`` compute and start afresh; at the run's end
every state not computed yet is computed (at the step of its last update, as the probe does at
close) and the run's instances are freed.

Example:
    >>> import numpy as np
    >>> body = encode_payload("b1", [TensorItem(0, "train", "fc", "activations", np.ones((2, 3)), None,
    ...                                          [{"name": "mean", "kwargs": {}}])])
    >>> batch_id, items = decode_payload(body)
    >>> batch_id, items[0].layer, items[0].tensor.shape
    ('b1', 'fc', (2, 3))
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from starlette.concurrency import run_in_threadpool

from sonde.errors import ConfigError
from sonde.metrics.base import Capture, Metric
from sonde.metrics.registry import registry
from sonde.server.api.common import MAX_NAME, TENSOR_TYPES, RunName, check_text, require_type

if TYPE_CHECKING:
    from sonde.sinks.base import Sink

__all__ = ["MARKS", "Mark", "ServerMetric", "TensorItem", "bind_server_metrics", "decode_payload", "encode_payload",
           "router", "shift_steps"]

log = logging.getLogger("sonde")

#: Most items (tensors) in one payload.
MAX_ITEMS = 10_000
#: Most metric specs one item may list.
MAX_SPECS = 64
MAX_STEP = 2**31 - 1
#: The marks a payload item may carry, by the boundary (``Metric.boundary``) they announce.
MARKS = {"epoch": "epoch_end", "run": "run_end"}


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


# -- payload ---------------------------------------------------------------------------------------
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


def decode_payload(body: bytes) -> tuple[str, list[TensorItem | Mark]]:
    """Check and decode a tensors payload; ValueError saying what is wrong."""
    try:
        meta = _header(body).get("__metadata__") or {}
        arrays = st_load(body)
    except (ValueError, SafetensorError, UnicodeDecodeError) as exc:
        raise ValueError(f"the body must be a safetensors file; it could not be read: {exc}") from exc
    batch_id = meta.get("batch_id")
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 200:
        raise ValueError(f"metadata batch_id must be a string of 1 to 200 characters; got {batch_id!r:.80}")
    check_text(batch_id, "batch_id")
    try:
        listed = json.loads(meta.get("items", ""))
    except ValueError as exc:
        raise ValueError(f"metadata items must be a JSON list of items; {exc}") from exc
    if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_ITEMS:
        raise ValueError(f"metadata items must be a JSON list of 1 to {MAX_ITEMS} items")
    items: list[TensorItem | Mark] = []
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise ValueError(f"item {i} must be an object; got {entry!r:.80}")
        if "mark" in entry:
            items.append(_decode_mark(i, entry))
            continue
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            raise ValueError(f"item {i}: step must be an integer from 0 to {MAX_STEP}; got {step!r:.40}")
        names = {}
        for key in ("phase", "layer", "topic", "layer_type"):
            value = entry.get(key, "") if key == "layer_type" else entry.get(key)
            if not isinstance(value, str) or len(value) > MAX_NAME or (not value and key in ("phase", "topic")):
                raise ValueError(f"item {i}: {key} must be a string of at most {MAX_NAME} characters; "
                                 f"got {value!r:.80}")
            names[key] = check_text(value, f"item {i}: {key}")
        tensor = arrays.get(str(entry.get("tensor")))
        if tensor is None:
            raise ValueError(f"item {i}: tensor {entry.get('tensor')!r:.80} is not in the body")
        labels = None
        if entry.get("labels") is not None:
            labels = arrays.get(str(entry["labels"]))
            if labels is None or labels.ndim != 1 or tensor.ndim == 0 or len(labels) != tensor.shape[0]:
                raise ValueError(f"item {i}: labels must be a 1-D tensor with one label per row of the tensor")
        items.append(TensorItem(step, names["phase"], names["layer"], names["topic"], tensor, labels,
                                _decode_specs(i, entry), names["layer_type"]))
    return batch_id, items


def _decode_specs(i: int, entry: dict[str, Any]) -> list[dict[str, Any]]:
    specs = entry.get("metrics")
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_SPECS:
        raise ValueError(f"item {i}: metrics must be a list of 1 to {MAX_SPECS} {{name, kwargs}}; got {specs!r:.80}")
    for spec in specs:
        try:
            metric_from_spec(spec)  # raises for unknown names and bad or out-of-bound arguments
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return specs


def _decode_mark(i: int, entry: dict[str, Any]) -> Mark:
    kind = entry["mark"]
    if kind not in MARKS.values():
        raise ValueError(f"item {i}: mark must be one of {', '.join(map(repr, MARKS.values()))}; got {kind!r:.40}")
    return Mark(kind, _decode_specs(i, entry))


def shift_steps(body: bytes, offset: int) -> bytes:
    """The payload with every step moved by ``offset`` (a resumed run created while the server was away)."""
    batch_id, items = decode_payload(body)
    for item in items:
        if isinstance(item, TensorItem):
            item.step += offset
    return encode_payload(batch_id, items)


def metric_from_spec(spec: Any) -> Metric:
    """The configured metric a spec ``{"name": ..., "kwargs": {...}}`` describes; ValueError when it cannot be built."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}),
                                                                                            dict):
        raise ValueError(f"a metric spec is {{\"name\": str, \"kwargs\": object}}; got {spec!r:.80}")
    table = registry()
    cls = table.get(spec["name"])
    if cls is None:
        raise ValueError(f"unknown metric {spec['name']!r:.80}; registered metrics are: {', '.join(sorted(table))}")
    if getattr(cls, "derived", False) or cls.reads_topics:
        raise ValueError(f"metric {spec['name']!r} is computed from other metrics' Records, not from tensors")
    kwargs = spec.get("kwargs", {})
    cls.check_settings(**kwargs)  # the bounds the metric declares, before anything is built
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metric {spec['name']!r} cannot be built with {spec.get('kwargs')!r:.200}: {exc}") from exc


# -- probe side ----------------------------------------------------------------------------------
def _cat(a: Any, b: Any) -> np.ndarray:
    return np.concatenate([np.atleast_1d(a), np.atleast_1d(b)])


class _Shipper:
    """Shared by a ServerMetric and its clones (``deepcopy`` keeps it); holds items until the sink takes them."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.items: deque[TensorItem | Mark] = deque()
        self.bytes = 0
        self.max_bytes = max_bytes
        self.dropped = 0
        self.lock = threading.Lock()
        # One pump at a time: the sender thread and the sink's close() both pump, and a batch popped
        # by one must reach the sink before the other can queue the run's end and close the outbox.
        self.pumping = threading.Lock()
        self.sink: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shipper:
        return self

    def ship(self, item: TensorItem) -> None:
        size = _wire_size(item)
        with self.lock:
            if self.bytes + size > self.max_bytes:
                if self.dropped == 0:
                    log.error("sonde: tensors for server-side metrics pile up faster than they are sent; dropping "
                              "some (lower sample= or every=)")
                self.dropped += 1
                return
            self.items.append(item)
            self.bytes += size

    def mark(self, mark: Mark) -> None:
        """Queue a boundary after every item shipped so far (never dropped: it carries no tensor)."""
        with self.lock:
            self.items.append(mark)

    def pump(self, most_bytes: int = 16 << 20) -> None:
        """Hand waiting items to the remote sink as payloads of at most ``most_bytes`` (sender thread)."""
        with self.pumping:
            self._pump(most_bytes)

    def _pump(self, most_bytes: int) -> None:
        while True:
            with self.lock:
                batch: list[TensorItem | Mark] = []
                size = 0
                while self.items and (not batch or size + _wire_size(self.items[0]) <= most_bytes):
                    item = self.items.popleft()
                    size += _wire_size(item)
                    batch.append(item)
                self.bytes -= size
            if not batch:
                return
            batch_id = str(uuid.uuid4())
            self.sink.put("tensors", encode_payload(batch_id, batch), batch_id=batch_id, count=len(batch))


def _wire_size(item: TensorItem | Mark) -> int:
    return 0 if isinstance(item, Mark) else item.tensor.nbytes // 2  # float64 on the host, float32 on the wire


class ServerMetric(Metric):
    """Runs a registered metric on the server's evaluator instead of the training process.

    The probe copies the first ``sample`` rows (all when None) of each tensor the metric would
    see (and the rows' labels, if any) and ships them at the end of the step; the evaluator runs
    ``metric`` configured with ``kwargs`` on them and stores its Records under the run, same
    names, same steps. Needs ``server=`` (or a ``RemoteSink``) on the probe.

    Args:
        metric: registered metric name (``"histogram"``, ``"saturation"``, ...).
        sample: rows (first dimension) shipped per tensor; None ships everything.
        every: when to ship, an int or a schedule (default: the probe's ``every=``).
        **kwargs: the metric's own arguments (JSON values: numbers, strings, lists), including
            its ``compute_every``/``reset``, which the evaluator honours.

    Example:
        >>> m = ServerMetric("histogram", bins=16, sample=128)
        >>> m.topics == registry()["histogram"].topics
        True
    """

    name = "server"
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"sample": (1, 1 << 20)}

    def __init__(self, metric: str, *, sample: int | None = 1024, every: Any = None, **kwargs: Any) -> None:
        super().__init__(every=every)
        spec = {"name": metric, "kwargs": kwargs}
        try:
            json.dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"ServerMetric({metric!r}, ...): {exc}; arguments must be JSON values") from exc
        try:
            inner = metric_from_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"ServerMetric({metric!r}, ...): {exc}") from exc
        self.check_settings(sample=sample)  # None ships every row
        self.spec = spec
        self.sample = sample
        self.topics = type(inner).topics  # type: ignore[misc]
        self.shipper = _Shipper()
        self.where: tuple[int, str, str, str, str] | None = None
        self.add_state("tensor", default=None, reduce=_cat)
        self.add_state("labels", default=None, reduce=_cat)

    def emits(self) -> tuple[str, ...]:
        return ()  # nothing computed here; the evaluator's Records come from the server

    def update(self, capture: Capture) -> None:
        tensor = capture.tensor.detach()
        if self.sample is not None and tensor.ndim > 0:
            tensor = tensor[: self.sample]
        # A copy: the probe reuses buffers and later layers may modify activations in place.
        self.stage("tensor", tensor.clone())
        labels = capture.labels
        if labels is not None and tensor.ndim > 0 and labels.ndim == 1 and len(labels) >= len(tensor):
            self.stage("labels", labels.detach()[: len(tensor)].clone())
        self.where = (capture.step, capture.phase, capture.layer, capture.topic, getattr(capture, "layer_type", ""))

    def compute(self) -> dict[str, Any]:
        tensor, labels = self.state["tensor"], self.state["labels"]
        if tensor is None or self.where is None:
            return {}
        if labels is not None and (np.ndim(tensor) == 0 or len(labels) != len(tensor)):
            labels = None
        step, phase, layer, topic, layer_type = self.where
        self.shipper.ship(TensorItem(step, phase, layer, topic, np.asarray(tensor), labels, [self.spec], layer_type))
        return {}

    def boundary(self, kind: str) -> None:
        """Tell the evaluator, in order with the shipped tensors, that an epoch or the run ended."""
        self.shipper.mark(Mark(MARKS[kind], [self.spec]))

    def __repr__(self) -> str:
        return f"ServerMetric({self.spec['name']!r}, sample={self.sample}, **{self.spec['kwargs']!r})"


def bind_server_metrics(metrics: Sequence[Metric], sinks: Sequence[Sink]) -> None:
    """Connect the probe's ServerMetrics to its remote sink; ConfigError when there is none."""
    wanted = [m for m in metrics if isinstance(m, ServerMetric)]
    if not wanted:
        return
    from sonde.sinks.remote import RemoteSink

    remote = next((s for s in sinks if isinstance(s, RemoteSink)), None)
    if remote is None:
        raise ConfigError(f"{wanted[0]!r} runs on a server: pass server='http://host:port' to sonde.probe")
    for metric in wanted:
        metric.shipper.sink = remote
        remote.feeders.append(metric.shipper.pump)


# -- the route -------------------------------------------------------------------------------------
router = APIRouter(tags=["tensors"])

_OPENAPI = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@router.post("/runs/{run}/tensors", status_code=202, openapi_extra=_OPENAPI)
async def ingest_tensors(run: RunName, request: Request) -> JSONResponse:
    """Queue shipped tensors for server-side metrics (safetensors); 202 at once, 503 when the queue is full."""
    from sonde.server.evaluator import evaluator_of

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
        return _error(404, f"no run '{run}'; create it first with POST /api/v1/runs")
    try:
        batch_id, items = await run_in_threadpool(decode_payload, body)
    except ValueError as exc:
        return _error(422 if "safetensors" not in str(exc) else 400, str(exc))
    outcome = evaluator_of(request.app).submit(run, batch_id, items)
    if outcome == "duplicate":
        return JSONResponse({"accepted": 0, "duplicate": True}, status_code=200)
    if outcome == "full":
        return _error(503, "the evaluator's queue is full; retry later", **{"Retry-After": "1"})
    return JSONResponse({"accepted": len(items), "duplicate": False}, status_code=202)


async def _forward(url: str, run: str, body: bytes, request: Request) -> JSONResponse:
    headers = {"Content-Type": "application/octet-stream"}
    if request.headers.get("authorization"):
        headers["Authorization"] = request.headers["authorization"]
    from urllib.parse import quote

    try:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            response = await client.post(f"/api/v1/runs/{quote(run, safe='')}/tensors", content=body,
                                         headers=headers)
    except httpx.TransportError as exc:
        return _error(503, f"the evaluator at {url} is unreachable ({type(exc).__name__}); retry later",
                      **{"Retry-After": "1"})
    try:
        content = response.json()
    except ValueError:
        content = {"error": response.text[:300]}
    return JSONResponse(content, status_code=response.status_code)
