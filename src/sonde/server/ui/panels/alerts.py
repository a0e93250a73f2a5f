"""The run page's alerts: where a problem started (step, layer, topic, what), newest first.

Shown only when the run has ``alert`` Records; redrawn when their number changes.
"""

from __future__ import annotations

from nicegui import ui

from sonde.server.ui.data import Choices
from sonde.server.ui.panel import Panel, RunContext

__all__ = ["ALERT_KINDS", "Alerts"]

#: What an alert on a topic is about, for alerts stored without their text.
ALERT_KINDS = {
    "activations": "dead units, saturation collapse or NaN/Inf",
    "weight_updates": "update ratio outside the healthy range",
}


class Alerts(Panel):
    """A table of the run's alerts (NiceGUI escapes its cells: messages are text, never markup)."""

    title = "Alerts"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        self.shown = -1  # how many alerts the table shows

    def wanted(self, choices: Choices) -> bool:
        return choices.has_alerts

    def build(self) -> None:
        self.box = ui.column().classes("w-full")

    async def load(self) -> None:
        alerts = await self.page.source.alerts(self.page.name)
        if len(alerts) == self.shown:
            return
        self.shown = len(alerts)
        self.box.clear()
        if not alerts:
            return
        rows = [{**a, "what": a["message"] or ALERT_KINDS.get(a["topic"], "NaN/Inf first seen here")} for a in alerts]
        with self.box, ui.card().classes("sonde-card").style("border-left: 4px solid #d62728"):
            with ui.row().classes("items-baseline gap-3 px-2"):
                ui.label(f"{self.title} ({len(alerts)})").classes("text-base font-semibold text-negative")
                ui.label("where a problem started; the charts below show it").classes("sonde-muted")
            ui.table(columns=[{"name": k, "label": k, "field": k, "align": "left"}
                              for k in ("step", "layer", "topic", "what", "phase")],
                     rows=rows, pagination=5).props("flat dense data-view=alerts").classes("w-full")

    async def refresh(self) -> None:
        await self.load()
