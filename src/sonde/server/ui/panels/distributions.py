"""The run page's "Distributions over training": a layer's histograms over steps, two topics side by side.

Any topic recorded with the ``histogram`` metric can be shown; it opens on the weights and their
gradients of the first layer with parameters. A click on an overview row shows that layer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nicegui import ui

from sonde.server.ui.charts import histogram_options
from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.panel import Panel, RunContext, offer, selector
from sonde.server.ui.source import off_loop

__all__ = ["Distributions"]

_SIDES = ("left", "right")


class Distributions(Panel):
    """Histograms over time of one layer: a chart per side, each with its topic."""

    title = "Distributions over training"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        topics = page.choices.histogram_topics
        with_params = [row["name"] for row in page.layer_rows if row["params"]] or page.layers
        left = page.choices.histogram_default() or "weights"  # a run without histograms yet may record them later
        right = "weight_grads" if left != "weight_grads" else next((t for t in topics if t != left), "")
        self.layer = with_params[0] if with_params else ""
        self.topics = {"left": left, "right": right}
        self.selects: dict[str, ui.select] = {}
        self.by_side: dict[str, LiveChart] = {}

    def build(self) -> None:
        topics = self.page.choices.histogram_topics
        with ui.card().classes("sonde-card"):
            with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
                ui.label(self.title).classes("text-base font-semibold")
                ui.label("histogram of each recorded step; colour = log count").classes("sonde-muted")
                ui.space()
                self.layer_select = selector(self.page.labels, self.layer, "layer", with_input=True)
            self.empty = ui.label("No histograms recorded in this run yet (the 'histogram' metric records them).")
            self.empty.classes("sonde-muted px-2").set_visibility(not topics)
            with ui.row().classes("w-full gap-4 no-wrap"):
                for side in _SIDES:
                    if not self.topics[side]:
                        continue
                    with ui.column().classes("flex-1 min-w-0 gap-1"):
                        self.selects[side] = selector(topics, self.topics[side], "topic").classes("ml-2")
                        self.by_side[side] = LiveChart(f"histogram-{side}", "320px", self._loader(side))
                        self.selects[side].on_value_change(lambda e, side=side: self._topic_changed(side, e.value))
        self.charts = list(self.by_side.values())
        self.layer_select.on_value_change(self._layer_changed)

    def _loader(self, side: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
        async def load() -> dict[str, Any] | None:
            page, topic = self.page, self.topics[side]
            if not self.layer or not topic:
                return None
            data = await page.source.histograms(page.name, self.layer, topic, phase=page.phase)
            if not data.get("steps") or not data.get("edges"):
                return None
            title = f"{page.labels.get(self.layer, self.layer)} · {topic}"
            return await off_loop(histogram_options, data, title=title)

        return load

    def choices_changed(self) -> None:
        topics = self.page.choices.histogram_topics
        self.empty.set_visibility(not topics)
        for side, select in self.selects.items():
            offer(select, topics, self.topics[side])

    def layer_picked(self, layer: str) -> None:
        self.layer_select.value = layer  # redraws through its handler

    def _topic_changed(self, side: str, topic: str) -> None:
        self.topics[side] = topic
        ui.timer(0, self.by_side[side].redraw, once=True)

    def _layer_changed(self, e: Any) -> None:
        self.layer = e.value
        self.redraw()
