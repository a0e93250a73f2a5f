"""Where the REST API lives and what each request the probe side sends looks like.

:data:`PREFIX` is the one spelling of the API's version prefix; :data:`ROUTES` names every request a
probe (the remote sink and its outbox), the aggregator and the evaluator send, with its method, path
below the prefix and Content-Type; :func:`path` builds the URL path of one. The Content-Types a route
takes are here too, so the server checks exactly what sonde's own clients send.

Example:
    >>> path("records", "mlp/1")
    '/api/v1/runs/mlp%2F1/records'
    >>> ROUTES["tensors"]
    ('POST', '/tensors', 'application/octet-stream')
"""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["JSON_TYPE", "MAX_NAME", "MSGPACK_TYPES", "PREFIX", "ROUTES", "TENSOR_TYPES", "check_text", "path"]

#: Where the versioned REST API lives.
PREFIX = "/api/v1"

#: Longest run, layer, topic, metric or phase name the API accepts.
MAX_NAME = 1000

#: The Content-Types a msgpack body (a batch of Records) may come as; the first is what sonde sends.
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
#: The Content-Types a safetensors body (shipped tensors) may come as.
TENSOR_TYPES = ("application/octet-stream",)
#: The Content-Type of every JSON body sonde sends.
JSON_TYPE = "application/json"

#: Per request kind: the method, the path below ``/runs/{run}`` ("" for the run itself, created by
#: ``POST /runs``) and the Content-Type sonde sends it with.
ROUTES: dict[str, tuple[str, str, str]] = {
    "run": ("POST", "", JSON_TYPE),
    "records": ("POST", "/records", MSGPACK_TYPES[0]),
    "finish": ("POST", "/finish", JSON_TYPE),
    "graph": ("PUT", "/graph", JSON_TYPE),
    "tensors": ("POST", "/tensors", TENSOR_TYPES[0]),
    "heartbeat": ("POST", "/heartbeat", JSON_TYPE),
}


def path(kind: str, run: str) -> str:
    """The URL path of request ``kind`` for ``run`` (``run`` creation posts to ``/runs``)."""
    if kind == "run":
        return f"{PREFIX}/runs"
    return f"{PREFIX}/runs/{quote(run, safe='')}{ROUTES[kind][1]}"


def check_text(value: str, what: str = "text") -> str:
    """``value`` if a database can store it as text, else ValueError saying why.

    NUL characters (PostgreSQL refuses them in text) and lone surrogates (not encodable as UTF-8)
    are the two things a JSON or URL string can carry that no database takes.

    Example:
        >>> check_text("fc1", "layer")
        'fc1'
    """
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters; got {value[:60]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode text (no lone surrogates); got {value[:60]!r}") from None
    return value
