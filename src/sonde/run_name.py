"""The rule for a run's name: one segment of a URL path.

The server and the dashboard address a run as ``/api/v1/runs/<name>`` and ``/runs/<name>``, so a
name that is not one path segment (``a/b``, ``.``, ``..``: clients and proxies resolve the dots
away) names a run no request can reach, and a remote probe would lose every Record of it. One
rule wherever a run is created: the probe (a ConfigError before anything is written) and the
server (``POST /api/v1/runs`` answers 422).

Example:
    >>> check_run_name("mlp-digits")
    'mlp-digits'
    >>> check_run_name("..")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sonde.errors.ConfigError: a run name must be one segment of a URL path (not empty, no '/', not '.' or '..'), ...
"""

from __future__ import annotations

from typing import Any

from sonde.errors import ConfigError

__all__ = ["check_run_name"]


def check_run_name(name: Any) -> str:
    """``name`` when it can name a run: a string that is one segment of a URL path.

    Raises:
        ConfigError: (a ValueError) saying what a run name must be.
    """
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ConfigError(
            "a run name must be one segment of a URL path (not empty, no '/', not '.' or '..'), as the server "
            f"and the dashboard address a run as /runs/<name>; got {name!r}; choose a name such as 'mlp-1'"
        )
    return name
