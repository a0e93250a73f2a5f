"""The REST API under ``/api/v1``: runs, Record ingest, plotting queries, graphs, shipped tensors.

Every router here reads the store from ``request.app.state.store``; :func:`api_router` joins them.

Example:
    >>> from fastapi import FastAPI
    >>> app = FastAPI()
    >>> app.include_router(api_router())
"""

from __future__ import annotations

from fastapi import APIRouter

from sonde.server.api import graph, queries, records, runs, tensors
from sonde.wire.routes import PREFIX

__all__ = ["PREFIX", "api_router"]


def api_router() -> APIRouter:
    """All REST routes of the frontend role, under :data:`PREFIX`."""
    router = APIRouter(prefix=PREFIX)
    for module in (runs, records, queries, graph, tensors):
        router.include_router(module.router)
    return router
