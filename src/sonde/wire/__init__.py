"""The probe↔server protocol: routes, the Record and tensor codecs, the retry policy, one HTTP client.

Everything both ends of a remote probe must agree on lives here, and nothing else: the remote
sink, its outbox, the server's routes, the aggregator and the evaluator all read it, and it
imports only the core (:mod:`sonde.records`). It never imports a framework, the metrics, the
store or the server, so a training process that ships Records loads neither FastAPI nor the store.

* :mod:`sonde.wire.routes`: :data:`PREFIX` (``/api/v1``), the request kinds with their method, path
  and Content-Type, the name bound and the text check.
* :mod:`sonde.wire.records`: the msgpack batch of Records (encode, decode, shift steps).
* :mod:`sonde.wire.tensors`: the safetensors payload of shipped tensors (encode, decode, shift steps).
* :mod:`sonde.wire.retry`: which answers are worth retrying, and the backoff.
* :mod:`sonde.wire.client`: :class:`WireClient` / :class:`AsyncWireClient`.

Example:
    >>> from sonde.wire import PREFIX, retryable
    >>> PREFIX, retryable(503)
    ('/api/v1', True)
"""

from __future__ import annotations

from sonde.wire.client import AsyncWireClient, WireClient, auth_headers, normal_url
from sonde.wire.errors import WireError
from sonde.wire.records import decode_records, encode_records, shift_records
from sonde.wire.retry import RETRY_STATUS, Backoff, refused, retryable
from sonde.wire.routes import JSON_TYPE, MAX_NAME, MSGPACK_TYPES, PREFIX, ROUTES, TENSOR_TYPES, check_text, path
from sonde.wire.tensors import MARKS, Mark, TensorItem, decode_payload, encode_payload, shift_steps

__all__ = [
    "JSON_TYPE",
    "MARKS",
    "MAX_NAME",
    "MSGPACK_TYPES",
    "PREFIX",
    "RETRY_STATUS",
    "ROUTES",
    "TENSOR_TYPES",
    "AsyncWireClient",
    "Backoff",
    "Mark",
    "TensorItem",
    "WireClient",
    "WireError",
    "auth_headers",
    "check_text",
    "decode_payload",
    "decode_records",
    "encode_payload",
    "encode_records",
    "normal_url",
    "path",
    "refused",
    "retryable",
    "shift_records",
    "shift_steps",
]
