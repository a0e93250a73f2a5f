"""The run page's "Layers over training": one metric of several layers overlaid, as lines over steps.

It opens on the overview's metric and, once the overview's first heatmap is in, on the layers that
moved most in it (:func:`pick_changing`). A click on an overview row adds that layer. Where a point
stands for several steps, a min–max band keeps a one-step spike visible; zooming re-queries in detail.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nicegui import ui

from sonde.server.ui.charts import lines_options
from sonde.server.ui.data import LOG_METRICS, pick_changing, pick_layers
from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.panel import Panel, RunContext, offer, selector
from sonde.server.ui.panels.overview import follow_metric, follow_topic, zoom_note
from sonde.server.ui.source import off_loop

__all__ = ["LayersOverTraining"]


class LayersOverTraining(Panel):
    """Per-layer lines of one (topic, metric); several layers overlay."""

    title = "Layers over training"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        default = page.choices.heatmap_default()
        self.topic = default[0] if default else ""
        self.metric = default[1] if default else ""
        self.log = bool(default and default[1] in LOG_METRICS)
        self.layers = pick_layers(page.layers)

    def build(self) -> None:
        choices, labels = self.page.choices, self.page.labels
        with ui.card().classes("sonde-card"):
            with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
                ui.label(self.title).classes("text-base font-semibold")
                ui.space()
                self.topic_select = selector(list(choices.layer_metrics), self.topic, "topic")
                self.metric_select = selector(choices.layer_metrics.get(self.topic or "", []), self.metric, "metric")
                self.log_switch = ui.switch("log y", value=bool(self.log))
            self.layer_select = ui.select(labels, value=self.layers, label="layers (several overlay)", multiple=True,
                                          with_input=True).props("dense outlined use-chips").classes("w-full px-2")
            self.chart = LiveChart("lines", "360px", self._load, zoomable=True)
        self.charts = [self.chart]
        self.topic_select.on_value_change(lambda e: follow_topic(self, self.metric_select, e.value))
        self.metric_select.on_value_change(lambda e: follow_metric(self, self.log_switch, e.value))
        self.layer_select.on_value_change(self._layers_changed)
        self.log_switch.on_value_change(self._log_changed)

    async def _load(self) -> dict[str, Any] | None:
        page = self.page
        chosen = list(self.layers or [])
        if not chosen or not self.topic or not self.metric:
            return None
        window = self.chart.window
        results = await asyncio.gather(*(page.source.series(page.name, layer, self.topic, self.metric,
                                                            phase=page.phase, window=window) for layer in chosen))
        series = [(page.labels.get(layer, layer), r) for layer, r in zip(chosen, results, strict=True)
                  if r.get("step")]
        if not series:
            return None
        points = max(len(r["step"]) for _, r in series)
        self.chart.caption.text = (f"{len(series)} layers · up to {points} points each "
                                   f"(min–max band where a point stands for several steps){zoom_note(window)}")
        return await off_loop(lines_options, series, title=f"{self.topic} · {self.metric}", log=self.log)

    async def load(self) -> None:
        """After the overview's first heatmap: open on the layers that moved most in it."""
        try:
            await asyncio.wait_for(self.page.overview_ready.wait(), timeout=30)
        except asyncio.TimeoutError:
            pass
        moved = pick_changing(self.page.overview.get("data", {}))
        same_view = (self.topic, self.metric) == self.page.overview.get("view")
        if moved and moved != self.layers and same_view:
            self.layer_select.set_value(moved)  # its change handler redraws
        else:
            await self.chart.redraw()

    def choices_changed(self) -> None:
        choices = self.page.choices
        if not self.topic and choices.heatmap_default():  # the run had no per-layer metric yet
            self.topic, self.metric = choices.heatmap_default() or ("", "")
        offer(self.topic_select, list(choices.layer_metrics), self.topic)
        offer(self.metric_select, choices.layer_metrics.get(self.topic, []), self.metric)

    def layer_picked(self, layer: str) -> None:
        if layer not in self.layers:
            self.layer_select.value = [*self.layers, layer]  # redraws through its handler

    def _layers_changed(self, e: Any) -> None:
        self.layers = list(e.value or [])
        self.redraw()

    def _log_changed(self, e: Any) -> None:
        self.log = bool(e.value)
        self.redraw()
