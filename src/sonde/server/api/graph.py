"""A run's graph (topology from ``sonde.graph``): store it, fetch it.

Example:
    PUT /api/v1/runs/mlp/graph {"nodes": [...], "edges": [...]}  → 200 {"stored": "mlp"}
    GET /api/v1/runs/mlp/graph                                   → the same object

A graph is checked against the format ``sonde.graph`` writes (:func:`sonde.graph.validate.validate_graph`)
before it is stored: a malformed one answers 422 naming what was expected.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from sonde.errors import ConfigError, GraphError
from sonde.graph.validate import validate_graph
from sonde.server.api.common import RunName, fail, need_run, store_of

__all__ = ["router"]

router = APIRouter(tags=["graph"])


@router.put("/runs/{run}/graph")
def put_graph(run: RunName, graph: Annotated[dict[str, Any], Body()], request: Request) -> dict[str, str]:
    """Store (replace) the run's graph (``Graph.to_dict()``'s JSON; 422 naming the problem when malformed)."""
    store = store_of(request)
    try:
        store.put_graph(need_run(store, run), validate_graph(graph))
    except (ConfigError, GraphError) as exc:
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

