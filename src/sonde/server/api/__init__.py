"""The REST API under ``/api/v1``: runs, Record ingest, plotting queries, graphs (and tensors, task C2).

Every router here reads the store from ``request.app.state.store``; :func:`api_router` joins them.

Example:
    >>> from fastapi import FastAPI
    >>> app = FastAPI()
    >>> app.include_router(api_router())
"""

from __future__ import annotations

import importlib
import logging

from fastapi import APIRouter

from sonde.server.api import graph, queries, records, runs

__all__ = ["PREFIX", "api_router"]

log = logging.getLogger("sonde.server")

#: Where the versioned REST API lives.
PREFIX = "/api/v1"


def api_router() -> APIRouter:
    """All REST routes of the frontend role, under :data:`PREFIX`."""
    router = APIRouter(prefix=PREFIX)
    for module in (runs, records, queries, graph):
        router.include_router(module.router)
    try:  # tensor ingest for server-side tasks is task C2's module; optional until it lands
        tensors = importlib.import_module("sonde.server.api.tensors")
    except ImportError as exc:
        if exc.name != "sonde.server.api.tensors":
            log.warning("sonde.server.api.tensors failed to import (%s); tensor ingest is off", exc)
        return router
    router.include_router(tensors.router)
    return router
