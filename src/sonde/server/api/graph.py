"""A run's graph (topology from ``sonde.graph``): store it, fetch it.

Example:
    PUT /api/v1/runs/mlp/graph {"nodes": [...], "edges": [...]}  → 200 {"stored": "mlp"}
    GET /api/v1/runs/mlp/graph                                   → the same object
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from sonde.errors import ConfigError
from sonde.server.api.common import RunName, fail, need_run, store_of

__all__ = ["router"]

router = APIRouter(tags=["graph"])


@router.put("/runs/{run}/graph")
def put_graph(run: RunName, graph: Annotated[dict[str, Any], Body()], request: Request) -> dict[str, str]:
    """Store (replace) the run's graph: any JSON object."""
    store = store_of(request)
    try:
        store.put_graph(need_run(store, run), graph)
    except ConfigError as exc:
        fail(422, str(exc))
    return {"stored": run}


@router.get("/runs/{run}/graph")
def get_graph(run: RunName, request: Request) -> dict[str, Any]:
    """The run's graph (404 when none was stored)."""
    store = store_of(request)
    graph = store.get_graph(need_run(store, run))
    if graph is None:
        fail(404, f"run '{run}' has no graph; a probe stores it on its first step (PUT this URL to set one)")
    return graph

