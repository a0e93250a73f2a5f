"""A chart that loads itself: placeholder first, data when ready, live merges, zoom-to-detail.

Every chart of the dashboard is a :class:`LiveChart` around a loader coroutine that returns ECharts
options (or None for "nothing recorded yet"). ``redraw`` builds the chart anew (a selection
changed); ``refresh`` re-queries and merges into the drawn chart, so a live update keeps the
user's zoom. A *zoomable* chart also watches the chart's zoom: when the user zooms into a
range of steps, the loader is asked again with that window (``chart.window``), so a
100,000-step series shows every step once the window is narrow enough, not the same 2,000
buckets stretched. Line charts (a value step axis) and the overview heatmap (one category per
step column) both work this way; the toolbox's "reset zoom" drops the window again.

Example:
    >>> chart = LiveChart("lines", "360px", load_lines, zoomable=True)   # doctest: +SKIP
    >>> ui.timer(0, chart.redraw, once=True)                            # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from nicegui import background_tasks, ui

__all__ = ["LiveChart", "category_window", "step_columns", "step_extent", "zoom_window"]

log = logging.getLogger("sonde")


def step_extent(options: dict[str, Any]) -> tuple[int, int] | None:
    """The first and last step drawn by the line series of chart ``options`` (None when empty).

    Example:
        >>> step_extent({"series": [{"type": "line", "data": [[3, 1.0], [90, 2.0]]}]})
        (3, 90)
    """
    steps = [point[0] for s in options.get("series", []) if s.get("type") == "line" for point in s.get("data", [])]
    return (int(min(steps)), int(max(steps))) if steps else None


def zoom_window(extent: tuple[int, int], start: float, end: float) -> tuple[int, int | None] | None:
    """The steps a zoom of ``start``..``end`` percent covers of ``extent``; None when zoomed out.

    A zoom that reaches the right edge is open-ended (``None`` as its last step), so a live run
    keeps showing its newest steps in detail.

    Example:
        >>> zoom_window((0, 100_000), 25.0, 50.0)
        (25000, 50000)
        >>> zoom_window((0, 100_000), 90.0, 100.0)
        (90000, None)
        >>> zoom_window((0, 100_000), 0.0, 100.0) is None
        True
    """
    if start <= 0.0 and end >= 100.0:
        return None
    lo, hi = extent
    first = int(lo + (hi - lo) * max(0.0, start) / 100.0)
    return first, (None if end >= 100.0 else round(lo + (hi - lo) * end / 100.0))


def step_columns(options: dict[str, Any]) -> list[int] | None:
    """The steps of a chart whose x axis has one category per step (a heatmap), else None.

    Example:
        >>> step_columns({"xAxis": {"type": "category", "name": "step", "data": ["0", "40", "41"]}})
        [0, 40, 41]
        >>> step_columns({"xAxis": {"type": "value", "name": "step"}}) is None
        True
    """
    axis = options.get("xAxis")
    if not isinstance(axis, dict) or axis.get("type") != "category" or axis.get("name") != "step":
        return None
    try:
        return [int(s) for s in axis.get("data", [])]
    except (TypeError, ValueError):
        return None


def category_window(steps: list[int], start: float, end: float) -> tuple[int, int | None] | None:
    """The steps a zoom of ``start``..``end`` percent covers of a one-column-per-step axis.

    ECharts spreads a category axis's zoom percentages over the column indices; the window
    reaches from the first column shown to the last (rounded outwards, so nothing shown is left
    out). Like :func:`zoom_window`, a zoom to the right edge is open-ended and a full zoom is None.

    Example:
        >>> category_window([0, 10, 20, 30, 40], 25.0, 50.0)
        (10, 20)
        >>> category_window([0, 10, 20, 30, 40], 60.0, 100.0)
        (20, None)
        >>> category_window([0, 10, 20], 0.0, 100.0) is None
        True
    """
    if (start <= 0.0 and end >= 100.0) or not steps:
        return None
    last = len(steps) - 1
    first = min(last, max(0, math.floor(last * start / 100.0 + 1e-9)))
    final = min(last, max(first, math.ceil(last * end / 100.0 - 1e-9)))
    return steps[first], (None if end >= 100.0 else steps[final])


class LiveChart:
    """One chart with a loader (see the module docstring).

    Args:
        name: the chart's ``data-chart`` (and its caption's ``data-caption``) attribute.
        height: CSS height of the chart.
        load: coroutine function returning ECharts options, or None for "nothing recorded yet".
        on_click: called with a clicked point's event.
        zoomable: re-query the zoomed step range in detail (see the module docstring).
    """

    def __init__(self, name: str, height: str, load: Callable[[], Awaitable[dict[str, Any] | None]], *,
                 on_click: Callable[[Any], None] | None = None, zoomable: bool = False) -> None:
        self.name = name
        self.height = height
        self.load = load
        self.on_click = on_click
        self.zoomable = zoomable
        #: The step range the user zoomed into (loaders fetch it in detail), or None.
        self.window: tuple[int, int | None] | None = None
        self.box = ui.column().classes("w-full gap-0")
        self.caption = ui.label("").classes("sonde-muted px-2").props(f"data-caption={name}")
        self.chart: ui.echart | None = None
        self._extent: tuple[int, int] | None = None
        self._columns: list[int] | None = None  # the step of each column, for a category step axis
        self._busy = asyncio.Lock()
        self._started = False
        self._zoom_due = False
        with self.box:
            ui.skeleton().classes("w-full").style(f"height: {height}")

    async def redraw(self) -> None:
        """Query and draw from scratch (after a selection changed); the zoom is reset."""
        self._started = True
        self.window = None
        async with self._busy:
            options = await self._options()
            self.box.clear()
            with self.box:
                if options is None:
                    self.chart = None
                    ui.label("Nothing recorded for this choice yet.").classes("sonde-muted p-4")
                    return
                self._extent = step_extent(options)
                self._columns = step_columns(options)
                self.chart = ui.echart(options, on_point_click=self.on_click)
                self.chart.style(f"height: {self.height}").props(f"data-chart={self.name}")
                if self.zoomable:
                    self.chart.on("chart:datazoom", self._zoomed, ["start", "end", "batch"])
                    self.chart.on("chart:restore", self._restored, [])

    async def refresh(self) -> None:
        """Query again and merge into the drawn chart (keeps zoom); skipped while a query runs."""
        if self._busy.locked() or not self._started:
            return
        if self.chart is None:
            await self.redraw()
            return
        async with self._busy:
            options = await self._options()
            if options is None or self.chart is None:
                return
            # Spliced or not, the series span the whole run: the zoom's percentages refer to this.
            self._extent = step_extent(options) or self._extent
            self._columns = step_columns(options)  # a spliced heatmap has new columns: the zoom refers to these
            self.chart.options.clear()
            self.chart.options.update(options)
            self.chart.update()

    def _zoomed(self, event: Any) -> None:
        args = event.args if isinstance(event.args, dict) else {}
        batch = args.get("batch") or [args]
        start, end = batch[0].get("start"), batch[0].get("end")
        if start is None or end is None:
            return
        if self._columns is not None:
            self.window = category_window(self._columns, float(start), float(end))
        elif self._extent is not None:
            self.window = zoom_window(self._extent, float(start), float(end))
        else:
            return
        self._schedule_zoom()

    def _restored(self, _event: Any) -> None:
        """The toolbox's "reset zoom": back to the whole run, without the detail query."""
        self.window = None
        self._schedule_zoom()

    def _schedule_zoom(self) -> None:
        if not self._zoom_due:  # one query per burst of zoom events (a drag sends dozens)
            self._zoom_due = True
            background_tasks.create(self._apply_zoom(), name=f"sonde zoom {self.name}")

    async def _apply_zoom(self) -> None:
        await asyncio.sleep(0.3)
        self._zoom_due = False
        while self._busy.locked():  # a live refresh that started before the zoom: query again after it
            await asyncio.sleep(0.05)
        await self.refresh()

    async def _options(self) -> dict[str, Any] | None:
        try:
            options = await self.load()
        except Exception as exc:  # noqa: BLE001  # a failing query must not kill the page; say what happened
            log.warning("sonde dashboard: %s chart failed: %s", self.name, exc)
            self.caption.text = f"could not load: {exc}"
            return None
        if self.caption.text.startswith("could not load"):
            self.caption.text = ""
        return options
