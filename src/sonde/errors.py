"""Every error sonde raises, in one place.

Hierarchy::

    SondeError                  base of everything below; catch this to catch all of sonde
    ├── ConfigError             misuse of the API: bad argument, unknown topic/metric/sink name
    │   └── LayerFilterError    a layer filter that matched no layer (lists real layer names)
    ├── ProbeError              the model cannot be probed as asked (already probed, wrong type)
    ├── GraphError              the model's forward pass could not be traced into a graph
    └── StoreError              the store cannot be opened or written
        └── RunExistsError      a run name that is already in the store, without ``resume=True``

Messages say what was expected, what was got, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GraphError",
    "LayerFilterError",
    "ProbeError",
    "RunExistsError",
    "SondeError",
    "StoreError",
]


class SondeError(Exception):
    """Base class of all errors raised by sonde."""


class ConfigError(SondeError, ValueError):
    """An argument of the public API is wrong (unknown name, wrong type or value)."""


class LayerFilterError(ConfigError):
    """A ``layers=`` or ``depth=`` selection matched no layer of the model."""


class ProbeError(SondeError, RuntimeError):
    """The model cannot be probed as asked."""


class GraphError(SondeError, RuntimeError):
    """The model's forward pass could not be traced into a graph (the message names the operation)."""


class StoreError(SondeError, OSError):
    """The store could not be opened or written."""


class RunExistsError(StoreError):
    """The run name is already in the store and ``resume=True`` was not passed."""
