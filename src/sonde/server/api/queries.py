"""Plotting queries: the layers and metrics of a run, downsampled series, heatmaps, histograms.

All of them read the store in SQL and return at most the number of points asked for, so a
100,000-step run answers as fast as a short one. NaN and ±inf come back as null (JSON has neither).

Every answer is bounded, whatever the run holds. A limit a request passes (``max_points`` over
100,000, ``max_steps`` over 5,000) is a 422. A heatmap or histogram view holds at most 500,000
values (:data:`~sonde.store.queries.MAX_CELLS`): at most 10,000 layers, at most 4,096 bins per
step (finer histograms come merged), and fewer step columns than asked for where the layers or
bins are many; such an answer carries ``"truncated": true`` (every heatmap and histogram answer
carries the flag).

Example:
    GET /api/v1/runs/mlp/series?layer=fc1&topic=weights&metric=norm&max_points=500
    → {"step": [0, 200, ...], "value": [...], "min": [...], "max": [...]}
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from sonde.server.api.common import MAX_NAME, RunName, need_run, safe_floats, storable_text, store_of

__all__ = ["router"]

router = APIRouter(tags=["queries"])

_MAX_STEP = 2**31 - 1
Name = Annotated[str, Query(max_length=MAX_NAME)]
Phase = Annotated[str, Query(min_length=1, max_length=MAX_NAME)]
Step = Annotated[int | None, Query(ge=0, le=_MAX_STEP)]


def _texts(**values: str) -> None:
    for what, value in values.items():
        storable_text(value, what)


@router.get("/runs/{run}/layers")
def get_layers(run: RunName, request: Request) -> list[dict[str, Any]]:
    """The run's probed layers in forward order: position, name, type, params (name → shape)."""
    store = store_of(request)
    df = store.layers(need_run(store, run))
    return [{"position": int(p), "name": n, "type": t, "params": s}
            for p, n, t, s in zip(df["position"], df["name"], df["type"], df["param_shapes"])]


@router.get("/runs/{run}/metrics")
def get_metrics(run: RunName, request: Request) -> list[list[str]]:
    """The ``[phase, topic, metric]`` triples the run has Records of."""
    store = store_of(request)
    return [list(t) for t in store.available(need_run(store, run))]


@router.get("/runs/{run}/series")
def get_series(
    run: RunName, request: Request, layer: Name, topic: Name, metric: Name, phase: Phase = "train",
    max_points: Annotated[int, Query(ge=1, le=100_000)] = 2000, start: Step = None, end: Step = None,
) -> dict[str, list[Any]]:
    """One metric of one layer over steps, at most ``max_points`` buckets (first step, mean, min, max)."""
    _texts(layer=layer, topic=topic, metric=metric, phase=phase)
    store = store_of(request)
    out = store.series(need_run(store, run), layer, topic, metric, phase, max_points, start, end)
    return {"step": out["step"], **{k: safe_floats(out[k]) for k in ("value", "min", "max")}}


@router.get("/runs/{run}/heatmap")
def get_heatmap(
    run: RunName, request: Request, topic: Name, metric: Name, phase: Phase = "train",
    max_steps: Annotated[int, Query(ge=1, le=5000)] = 400, start: Step = None, end: Step = None,
) -> dict[str, Any]:
    """Layers × steps of one topic's metric: ``{"layers", "steps", "values", "truncated"}`` (rows in forward order).

    At most ``max_steps`` step columns, picked evenly over the run or over ``start..end``
    (inclusive; a zoomed view asks for its range in detail).
    """
    _texts(topic=topic, metric=metric, phase=phase)
    store = store_of(request)
    out = store.heatmap(need_run(store, run), topic, metric, phase, max_steps, start, end)
    return {"layers": out["layers"], "steps": out["steps"], "values": [safe_floats(row) for row in out["values"]],
            "truncated": out["truncated"]}


@router.get("/runs/{run}/histograms")
def get_histograms(
    run: RunName, request: Request, layer: Name, topic: Name, phase: Phase = "train",
    max_steps: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> dict[str, Any]:
    """One layer's histogram counts over training: ``{"steps", "edges", "counts", "truncated"}``."""
    _texts(layer=layer, topic=topic, phase=phase)
    store = store_of(request)
    out = store.histograms(need_run(store, run), layer, topic, phase, max_steps)
    return {"steps": out["steps"], "edges": safe_floats(out["edges"]),
            "counts": [safe_floats(c) for c in out["counts"]], "truncated": out["truncated"]}
