"""The bounds of a run's ``config``: how deep and how large the JSON object a run carries may be.

One rule wherever a config enters: the probe (a ConfigError before anything is written), the
store (:meth:`Store.start_run <sonde.store.Store.start_run>`) and the server (``POST /api/v1/runs``
answers 422). Readers never trust a stored row: :func:`shown_config` turns a stored config that
breaks the rule, or cannot be read at all, into an error marker, so one bad row never breaks a
listing of runs.

Example:
    >>> check_config({"every": "10", "optimizer": "SGD"})
    {'every': '10', 'optimizer': 'SGD'}
    >>> shown_config('{"lr": 0.1}'), shown_config("not json")["error"][:37]
    ({'lr': 0.1}, "this run's stored config is not shown")
"""

from __future__ import annotations

import json
from typing import Any

from sonde.errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "check_config", "shown_config"]

#: The deepest nesting of objects and lists a run's config may have (``{"a": 1}`` is depth 1).
MAX_CONFIG_DEPTH = 32
#: The largest a run's config may be, as UTF-8 JSON.
MAX_CONFIG_BYTES = 64 << 10


def check_config(config: Any) -> dict[str, Any]:
    """``config`` when it is a JSON object within :data:`MAX_CONFIG_DEPTH` and :data:`MAX_CONFIG_BYTES`.

    Raises:
        ConfigError: (a ValueError) naming the bound it breaks.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a run's config must be an object (a dict); got {type(config).__name__}")
    depth = _depth(config)
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"a run's config may nest at most {MAX_CONFIG_DEPTH} levels of objects and lists; "
                          f"this one nests more than {MAX_CONFIG_DEPTH}")
    try:
        size = len(json.dumps(config, default=str).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a run's config must be JSON (string keys, JSON values); {exc}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"a run's config may be at most {MAX_CONFIG_BYTES} bytes as JSON; this one is {size} bytes")
    return config


def shown_config(stored: str) -> dict[str, Any]:
    """A stored config (JSON text) as readers show it: the object, or ``{"error": ...}`` when it cannot be shown."""
    try:
        return check_config(json.loads(stored))
    except (ValueError, TypeError, RecursionError) as exc:
        return {"error": f"this run's stored config is not shown: {str(exc)[:200]}"}


def _depth(value: Any) -> int:
    """Nesting depth of objects and lists, counted without recursion and given up past the bound."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_CONFIG_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest
