"""What every router shares: the store dependency, text checks, JSON-safe numbers, the error body.

Every error the API returns is a 4xx (or, for a fault of the server itself, a 5xx) with a JSON body
``{"error": "<what was wrong>"}``; :func:`fail` raises one.

Example:
    >>> safe_floats([1.0, float("nan"), float("inf")])
    [1.0, None, None]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, NoReturn

from fastapi import HTTPException, Path, Request
from pydantic import AfterValidator

from sonde.store import Store
from sonde.wire.routes import MAX_NAME, MSGPACK_TYPES, PREFIX, TENSOR_TYPES, check_text

__all__ = [
    "MAX_NAME",
    "MSGPACK_TYPES",
    "TENSOR_TYPES",
    "RunName",
    "Text",
    "check_text",
    "fail",
    "need_run",
    "require_type",
    "safe_floats",
    "storable_text",
    "store_of",
]


def fail(status: int, message: str) -> NoReturn:
    """Raise the HTTP error ``status`` whose JSON body is ``{"error": message}``."""
    raise HTTPException(status_code=status, detail=message)


def require_type(request: Request, accepted: tuple[str, ...], what: str) -> None:
    """415 unless the request's Content-Type is one of ``accepted`` (parameters such as charset aside).

    A binary route takes only its own type, so a page of another site can never reach it with a
    type it may send without asking (``text/plain``, form types).
    """
    given = request.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() not in accepted:
        also = f" ({', '.join(accepted[1:])} also accepted)" if len(accepted) > 1 else ""
        fail(415, f"{what} must be sent with Content-Type {accepted[0]}{also}; got {given[:80] or 'none'!r}")


def storable_text(value: str, what: str, status: int = 422) -> str:
    """``value`` if :func:`check_text` accepts it, else the HTTP error ``status`` saying why."""
    try:
        return check_text(value, what)
    except ValueError as exc:
        fail(status, str(exc))


#: A string the store can hold; validation fails (422) otherwise.
Text = Annotated[str, AfterValidator(check_text)]

#: A run name in a URL path.
RunName = Annotated[str, Path(min_length=1, max_length=MAX_NAME, description="run name")]


def store_of(request: Request) -> Store:
    """The app's store (set by ``create_app``)."""
    store: Store = request.app.state.store
    return store


def need_run(store: Store, run: str) -> str:
    """``run`` when the store has it; 400 for a name no database could hold, 404 when absent."""
    storable_text(run, "run name", 400)
    if not store.has_run(run):
        fail(404, f"no run '{run}'; GET {PREFIX}/runs lists the runs there are")
    return run


def safe_floats(values: Iterable[Any]) -> list[float | None]:
    """Floats for JSON: NaN and ±inf (which JSON cannot carry) become null."""
    return [v if v is not None and math.isfinite(v) else None for v in values]
