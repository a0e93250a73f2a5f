"""The run page's recording schedule, beside the run's name: what the overhead budget chose.

Shown only when the run recorded its intervals (a probe without ``every=``, see
:mod:`sonde.budget`): "recorded every 4th step to stay under 5%" for the densest metrics, the
others in its tooltip.
"""

from __future__ import annotations

from nicegui import ui

from sonde.server.ui.data import Choices
from sonde.server.ui.panel import Panel, RunContext

__all__ = ["Schedule"]


class Schedule(Panel):
    """The header's line about how often the run's metrics are recorded."""

    title = "Recording"
    slot = "header"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        self.label: ui.label | None = None
        self.shown: list[tuple[str, int, str]] = []

    def wanted(self, choices: Choices) -> bool:
        return choices.has_schedule

    def build(self) -> None:
        self.label = ui.label("").classes("sonde-muted").props("data-view=schedule")

    async def load(self) -> None:
        rows = await self.page.source.schedule(self.page.name)
        if self.label is None or not rows or rows == self.shown:
            return
        self.shown = rows
        _, _, first = rows[0]  # the densest: the statistics every layer gets
        self.label.text = first
        self.label.tooltip("\n".join(f"{metric}: {message}" for metric, _, message in rows))

    async def refresh(self) -> None:
        await self.load()
