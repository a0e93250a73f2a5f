"""The dashboard's reads, off the event loop: every store query runs on a worker thread.

A page awaits these; NiceGUI keeps serving other browsers meanwhile. Each returns plain,
JSON-ready dicts and lists (the shape of the REST API's answers).

Example:
    >>> source = Source(open_store("sonde.db"))     # doctest: +SKIP
    >>> await source.runs()                          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from nicegui import run

from sonde.server.ui.data import splice, splice_heatmap
from sonde.store import Store
from sonde.topics import SCHEDULE_TOPIC

__all__ = ["LINE_POINTS", "Source", "off_loop"]

_T = TypeVar("_T")

#: Points per line: a chart is ~1,300 px wide, so more points than this draw nothing more, only slower.
LINE_POINTS = 1200


async def off_loop(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` on a worker thread (NiceGUI's ``run.io_bound``), so the event loop stays free.

    Example:
        >>> options = await off_loop(heatmap_options, data, title="zero_frac")   # doctest: +SKIP
    """
    result = await run.io_bound(fn, *args, **kwargs)
    return result  # type: ignore[return-value]  # None only while NiceGUI shuts down


def _time(value: Any) -> float | None:
    if value is None:
        return None
    try:
        stamp = float(value.timestamp())
    except (AttributeError, ValueError):
        return None
    return stamp if math.isfinite(stamp) else None


class Source:
    """Asynchronous, read-only view of a :class:`Store` for the pages."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def runs(self) -> list[dict[str, Any]]:
        """Every run: name, model, framework, status, steps, started_at, updated_at, ended_at, heartbeat_at (UTC
        seconds); ``status`` is ``stalled`` for a running run whose writer went silent (see ``sonde.store.status``)."""
        return await off_loop(self._runs)

    def _runs(self) -> list[dict[str, Any]]:
        frame = self.store.runs()
        out: list[dict[str, Any]] = []
        for row in frame.itertuples(index=False):
            out.append({
                "name": str(row.name), "model": str(row.model), "framework": str(row.framework),
                "status": str(row.status), "steps": int(row.steps),  # type: ignore[arg-type]
                "started_at": _time(row.started_at), "updated_at": _time(row.updated_at),
                "ended_at": _time(row.ended_at), "heartbeat_at": _time(row.heartbeat_at),
            })
        return out

    async def run(self, name: str) -> dict[str, Any] | None:
        """One run's row of :meth:`runs`, or None when no run has that name."""
        return next((r for r in await self.runs() if r["name"] == name), None)

    async def layers(self, run_name: str) -> list[dict[str, Any]]:
        """The run's probed layers in forward (probe) order: ``name``, ``type``, ``params`` (owns parameters)."""

        def query() -> list[dict[str, Any]]:
            frame = self.store.layers(run_name)
            return [{"name": str(n), "type": str(t), "params": bool(p)}
                    for n, t, p in zip(frame["name"], frame["type"], frame["param_shapes"], strict=True)]

        return await off_loop(query)

    async def available(self, run_name: str) -> list[tuple[str, str, str]]:
        """The (phase, topic, metric) triples recorded for the run."""
        return await off_loop(lambda: [(str(p), str(t), str(m)) for p, t, m in self.store.available(run_name)])

    async def series(self, run_name: str, layer: str, topic: str, metric: str, *, phase: str = "train",
                     max_points: int = LINE_POINTS, window: tuple[int, int | None] | None = None
                     ) -> dict[str, Any]:
        """One downsampled series: ``step``, ``value``, ``min``, ``max``.

        With a ``window`` (first, last step; last None for "to the newest"), the steps inside it
        come from a second query of just that range (full detail when it holds ``max_points``
        steps or fewer), spliced into the whole-run series.
        """
        coarse = await off_loop(self.store.series, run_name, layer, topic, metric, phase=phase,
                                max_points=max_points)
        if window is None:
            return coarse
        fine = await off_loop(self.store.series, run_name, layer, topic, metric, phase=phase,
                              max_points=max_points, start=window[0], end=window[1])
        return splice(coarse, fine, *window)

    async def heatmap(self, run_name: str, topic: str, metric: str, *, phase: str = "train",
                      max_steps: int = 400, window: tuple[int, int | None] | None = None) -> dict[str, Any]:
        """Layers × steps of one metric: ``layers`` (forward order), ``steps``, ``values``.

        With a ``window`` (first, last step; last None for "to the newest"), the columns inside it
        come from a second query of just that range (every step when it holds ``max_steps`` or
        fewer), spliced into the whole-run heatmap, as :meth:`series` does for lines.
        """
        coarse = await off_loop(self.store.heatmap, run_name, topic, metric, phase=phase, max_steps=max_steps)
        if window is None:
            return coarse
        fine = await off_loop(self.store.heatmap, run_name, topic, metric, phase=phase, max_steps=max_steps,
                              start=window[0], end=window[1])
        return splice_heatmap(coarse, fine, *window)

    async def histograms(self, run_name: str, layer: str, topic: str, *, phase: str = "train",
                         max_steps: int = 200) -> dict[str, Any]:
        """Histogram counts over training: ``steps``, ``edges``, ``counts`` (one list per step)."""
        return await off_loop(self.store.histograms, run_name, layer, topic, phase=phase, max_steps=max_steps)

    async def alert_counts(self, run_names: list[str]) -> dict[str, int]:
        """How many ``alert`` Records each run has (runs without any are left out)."""
        if not run_names:
            return {}

        def query() -> dict[str, int]:
            frame = self.store.load(run_names, metrics="alert")
            return {str(k): int(v) for k, v in frame.groupby("run").size().items()}

        return await off_loop(query)

    async def schedule(self, run_name: str) -> list[tuple[str, int, str]]:
        """The overhead budget's latest intervals: ``(metric, interval, message)``, densest first."""

        def query() -> list[tuple[str, int, str]]:
            frame = self.store.load(run_name, topics=SCHEDULE_TOPIC, messages=True)
            if frame.empty:
                return []
            latest = frame[frame["step"] == frame["step"].max()]
            return sorted((str(m), int(v), str(text)) for m, v, text in
                          zip(latest["metric"], latest["value"], latest["message"], strict=True))

        rows = await off_loop(query)
        return sorted(rows, key=lambda row: (row[1], row[0]))

    async def alerts(self, run_name: str) -> list[dict[str, Any]]:
        """Records with metric ``alert``, newest first (at most 200), with their message when stored."""

        def query() -> list[dict[str, Any]]:
            frame = self.store.load(run_name, metrics="alert", messages=True)
            frame = frame.sort_values("step", ascending=False, kind="stable").head(200)
            return [{"step": int(step), "phase": str(phase), "layer": str(layer) or "(network)",
                     "topic": str(topic), "message": str(message)}
                    for step, phase, layer, topic, message in zip(frame["step"], frame["phase"], frame["layer"],
                                                                  frame["topic"], frame["message"], strict=True)]

        return await off_loop(query)
