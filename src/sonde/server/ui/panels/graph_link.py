"""The run page's link to its network graph (``/run/{name}/graph``), beside the run's name."""

from __future__ import annotations

from urllib.parse import quote

from nicegui import ui

from sonde.server.ui.panel import Panel

__all__ = ["GraphLink"]


class GraphLink(Panel):
    """The "Graph" button of the page header."""

    title = "Graph"
    slot = "header"

    def build(self) -> None:
        ui.button(self.title, icon="account_tree").props(
            f"outline no-caps data-link=graph href=/run/{quote(self.page.name)}/graph")
