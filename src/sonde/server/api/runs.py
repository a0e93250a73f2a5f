"""Runs: create (or resume), list, show, finish, delete.

Example:
    POST /api/v1/runs {"name": "mlp", "layers": [{"name": "fc1", "type": "Linear", "params": {"weight": [4, 8]}}]}
    → 201 {"name": "mlp", "first_step": 0}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import AfterValidator, BaseModel, Field

from sonde.errors import RunExistsError
from sonde.run_config import check_config
from sonde.run_info import LayerInfo, RunInfo
from sonde.run_name import check_run_name
from sonde.server.api.common import MAX_NAME, RunName, Text, fail, need_run, store_of

__all__ = ["FinishIn", "LayerIn", "RunCreated", "RunIn", "router"]

router = APIRouter(tags=["runs"])

Name = Annotated[Text, Field(min_length=1, max_length=MAX_NAME)]
Dim = Annotated[int, Field(ge=0, le=2**62)]


class LayerIn(BaseModel):
    """A probed layer: its module path, type and parameter shapes."""

    name: Name
    type: Annotated[Text, Field(max_length=MAX_NAME)] = ""
    params: dict[Annotated[Text, Field(max_length=MAX_NAME)], Annotated[list[Dim], Field(max_length=32)]] = {}


class RunIn(BaseModel):
    """A run to create, or with ``resume`` to reopen."""

    #: One segment of a URL path (:mod:`sonde.run_name`: no '/', not '.' or '..'); 422 otherwise.
    name: Annotated[Text, Field(min_length=1, max_length=MAX_NAME), AfterValidator(check_run_name)]
    model: Annotated[Text, Field(max_length=MAX_NAME)] = ""
    framework: Annotated[Text, Field(max_length=MAX_NAME)] = ""
    #: Any JSON object, at most 32 levels deep and 64 KiB as JSON (:mod:`sonde.run_config`); 422 otherwise.
    config: Annotated[dict[str, Any], AfterValidator(check_config)] = {}
    layers: Annotated[list[LayerIn], Field(max_length=100_000)] = []
    resume: bool = False


class RunCreated(BaseModel):
    """The created (or resumed) run and the first step the client should record."""

    name: str
    first_step: int


class FinishIn(BaseModel):
    """How a run ended."""

    status: Literal["finished", "failed", "running"] = "finished"


@router.post("/runs", status_code=201, response_model=RunCreated)
def create_run(body: RunIn, request: Request) -> RunCreated:
    """Create a run (409 when the name exists and ``resume`` is false); returns its first step."""
    store = store_of(request)
    names = [layer.name for layer in body.layers]
    if len(set(names)) != len(names):
        fail(422, "layer names must be unique within a run; got duplicates")
    info = RunInfo(
        name=body.name, model=body.model, framework=body.framework, config=body.config,
        layers=[LayerInfo(la.name, la.type, {k: list(v) for k, v in la.params.items()}) for la in body.layers],
        resume=body.resume,
    )
    try:
        first = store.start_run(info, resume=body.resume)
    except RunExistsError as exc:
        fail(409, str(exc))
    return RunCreated(name=body.name, first_step=first)


#: The most runs one ``GET /runs`` lists (``limit``'s default and bound).
MAX_LISTED = 1000


@router.get("/runs")
def list_runs(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = MAX_LISTED,
              offset: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, Any]]:
    """The runs, oldest first, ``limit`` at most after skipping ``offset``: name, model, framework,
    config, status, steps, started_at, updated_at, ended_at, layers."""
    return store_of(request).run_infos(limit, offset)


@router.get("/runs/{run}")
def get_run(run: RunName, request: Request) -> dict[str, Any]:
    """One run (404 when absent)."""
    store = store_of(request)
    info = store.run_info(need_run(store, run))
    if info is None:
        fail(404, f"no run '{run}'")
    return info


@router.delete("/runs/{run}")
def delete_run(run: RunName, request: Request) -> dict[str, str]:
    """Delete a run with its Records, layers and graph."""
    store = store_of(request)
    store.delete_run(need_run(store, run))
    return {"deleted": run}


@router.post("/runs/{run}/finish")
def finish_run(run: RunName, body: FinishIn, request: Request) -> dict[str, str]:
    """Mark a run finished or failed (or running again)."""
    store = store_of(request)
    store.finish_run(need_run(store, run), body.status)
    return {"name": run, "status": body.status}


@router.post("/runs/{run}/heartbeat")
def heartbeat(run: RunName, request: Request) -> dict[str, str]:
    """Stamp the run's heartbeat: its (remote) writer is alive, even when it has sent nothing for a while.

    A remote probe beats every few seconds while its run is open; a running run silent for longer
    than the server's ``stall_after`` is listed as ``stalled`` (see :mod:`sonde.store.status`).
    """
    store = store_of(request)
    store.heartbeat(need_run(store, run))
    return {"name": run}
