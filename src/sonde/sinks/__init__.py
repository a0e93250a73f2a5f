"""Where Records go. Built-in sinks register under the ``sonde.sinks`` entry-point group.

Example:
    >>> from sonde.sinks import resolve_sinks
    >>> [type(s).__name__ for s in resolve_sinks(["csv"])]
    ['CsvSink']
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib.metadata import entry_points

from sonde.errors import ConfigError
from sonde.run_info import LayerInfo, RunInfo
from sonde.sinks.base import Sink, SinkRunner

__all__ = ["LayerInfo", "RemoteSink", "RunInfo", "Sink", "SinkRunner", "VideoSink", "registry", "resolve_sinks"]


@functools.cache
def registry() -> dict[str, type[Sink]]:
    """Sink classes registered under ``sonde.sinks``, by name."""
    return {ep.name: ep.load() for ep in entry_points(group="sonde.sinks")}


def resolve_sinks(sinks: Sequence[str | Sink] | None) -> list[Sink]:
    """Sink instances from names (default settings) and/or configured instances."""
    resolved: list[Sink] = []
    for item in sinks or ():
        if isinstance(item, Sink):
            resolved.append(item)
        elif isinstance(item, str):
            table = registry()
            if item not in table:
                raise ConfigError(f"unknown sink {item!r}; registered sinks are: {', '.join(sorted(table))}")
            resolved.append(table[item]())
        else:
            raise ConfigError(f"sinks= expects sink names or sonde.sinks.Sink instances, got {item!r}")
    return resolved


def __getattr__(name: str) -> object:
    # Imported on first use: the remote sink pulls in httpx and msgpack, the video sink matplotlib.
    if name == "RemoteSink":
        from sonde.sinks.remote import RemoteSink

        return RemoteSink
    if name == "VideoSink":
        from sonde.sinks.video import VideoSink

        return VideoSink
    raise AttributeError(f"module 'sonde.sinks' has no attribute {name!r}")
