"""The run page's "Network overview": every layer (rows, forward order) × steps, coloured by one metric.

It opens on the metric that shows trouble at a glance (:meth:`Choices.heatmap_default`), owns the
page's phase selector, and a click on a cell shows that layer in the other panels
(:meth:`RunContext.pick_layer`). Zooming into a range of steps re-queries that range in detail.
"""

from __future__ import annotations

from typing import Any

from nicegui import ui

from sonde.server.ui.charts import heatmap_options
from sonde.server.ui.data import LOG_METRICS, heatmap_budget
from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.panel import Panel, RunContext, offer, selector
from sonde.server.ui.source import off_loop

__all__ = ["NetworkOverview", "follow_metric", "follow_topic", "zoom_note"]


def zoom_note(window: tuple[int, int | None] | None) -> str:
    """The caption's note on a zoomed chart's step window (``""`` when not zoomed).

    Example:
        >>> zoom_note((1000, None)), zoom_note(None)
        (' · steps 1,000–newest in detail', '')
    """
    if not window:
        return ""
    return f" · steps {window[0]:,}–{'newest' if window[1] is None else f'{window[1]:,}'} in detail"


def follow_topic(panel: Any, metric_choice: ui.select, topic: str) -> None:
    """A new topic: offer its metrics, keeping the panel's metric when the topic has it too."""
    panel.topic = topic
    metrics = panel.page.choices.layer_metrics.get(topic, [])
    metric_choice.set_options(metrics, value=panel.metric if panel.metric in metrics else metrics[0])


def follow_metric(panel: Any, log_choice: ui.switch, metric: str | None) -> None:
    """A new metric: a log scale when it spans decades, and a redraw."""
    if metric is None:
        return
    panel.metric = metric
    log_choice.value = metric in LOG_METRICS  # triggers its own redraw when it changes
    panel.redraw()


class NetworkOverview(Panel):
    """The layers × steps heatmap of one (topic, metric), with the page's phase selector."""

    title = "Network overview"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        choices = page.choices
        default = choices.heatmap_default()
        self.topic = default[0] if default else ""
        self.metric = default[1] if default else ""
        self.log = bool(default and default[1] in LOG_METRICS)
        page.phase = "train" if "train" in choices.phases or not choices.phases else choices.phases[0]

    def build(self) -> None:
        page, choices = self.page, self.page.choices
        with ui.card().classes("sonde-card"):
            with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
                ui.label(self.title).classes("text-base font-semibold")
                ui.label("every layer (rows, forward order) × steps; click a cell to plot that layer below").classes(
                    "sonde-muted")
                ui.space()
                self.topic_select = selector(list(choices.layer_metrics), self.topic, "topic")
                self.metric_select = selector(choices.layer_metrics.get(self.topic or "", []), self.metric, "metric")
                self.phase_select = selector(choices.phases, page.phase, "phase")
                self.log_switch = ui.switch("log colour", value=self.log)
            rows = max(8, min(len(page.layer_rows), 200))
            self.chart = LiveChart("heatmap", f"{min(900, 90 + 18 * rows)}px", self._load, on_click=self._clicked,
                                   zoomable=True)
        self.charts = [self.chart]
        self.topic_select.on_value_change(lambda e: follow_topic(self, self.metric_select, e.value))
        self.metric_select.on_value_change(lambda e: follow_metric(self, self.log_switch, e.value))
        self.log_switch.on_value_change(self._log_changed)
        self.phase_select.on_value_change(self._phase_changed)

    async def _load(self) -> dict[str, Any] | None:
        page = self.page
        try:
            if not self.topic or not self.metric:
                return None
            window = self.chart.window
            data = await page.source.heatmap(page.name, self.topic, self.metric, phase=page.phase,
                                             max_steps=heatmap_budget(len(page.layer_rows)), window=window)
            page.overview.setdefault("data", data)
            page.overview.setdefault("view", (self.topic, self.metric))
        finally:
            page.overview_ready.set()
        if not data.get("steps"):
            return None
        self.chart.caption.text = (f"{len(data['layers'])} layers × {len(data['steps'])} step columns"
                                   f"{zoom_note(window)}")
        return await off_loop(heatmap_options, data, title=f"{self.topic} · {self.metric}", log=self.log,
                              labels=page.labels, window=window)

    def choices_changed(self) -> None:
        choices = self.page.choices
        offer(self.phase_select, choices.phases, self.page.phase)
        if not self.topic and choices.heatmap_default():  # the run had no per-layer metric yet
            self.topic, self.metric = choices.heatmap_default() or ("", "")
        offer(self.topic_select, list(choices.layer_metrics), self.topic)
        offer(self.metric_select, choices.layer_metrics.get(self.topic, []), self.metric)

    def _log_changed(self, e: Any) -> None:
        self.log = bool(e.value)
        self.redraw()

    def _phase_changed(self, e: Any) -> None:
        self.page.phase = e.value
        self.page.redraw_all()

    def _clicked(self, e: Any) -> None:
        chart = self.chart.chart
        if chart is None or not isinstance(e.data, list) or len(e.data) < 2:
            return
        names = chart.options.get("yAxis", {}).get("data", [])
        row = int(e.data[1])
        by_label = {label: layer for layer, label in self.page.labels.items()}
        layer = by_label.get(names[row], names[row]) if 0 <= row < len(names) else None
        if layer:
            self.page.pick_layer(layer)
