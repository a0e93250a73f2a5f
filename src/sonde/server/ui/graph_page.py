"""The graph page (``/run/{name}/graph``): the network's layered graph coloured by a metric over training.

The page is one panel, :class:`~sonde.server.ui.panels.network_graph.NetworkGraph` (what the
controls do is said there). It follows a live run: new steps extend the slider (and are shown
when the slider sat at the newest step), new alerts and metrics appear.

Example:
    >>> register_graph_page(state_of_request, gate)   # done by sonde.server.ui.attach  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from nicegui import ui

from sonde.server.ui.data import Choices
from sonde.server.ui.graph_script import GRAPH_HEAD
from sonde.server.ui.layout import UIState, frame
from sonde.server.ui.panel import RunContext
from sonde.server.ui.panels.network_graph import NetworkGraph
from sonde.server.ui.source import off_loop

__all__ = ["build_graph_page", "register_graph_page"]


def register_graph_page(state_of: Callable[[Request], UIState], gate: Callable[[UIState, Request], bool]) -> None:
    """Register ``/run/{name}/graph`` (before the run page's catch-all ``/run/{name:path}``)."""

    @ui.page("/run/{name:path}/graph", title="Graph · sonde")
    async def graph_page(request: Request, name: str) -> None:
        state = state_of(request)
        if gate(state, request):
            await build_graph_page(state, name)


async def build_graph_page(state: UIState, name: str) -> None:
    """Draw the graph page of run ``name`` (or say why there is nothing to draw)."""
    source = state.source
    frame(f"{name} · graph")
    ui.add_head_html(GRAPH_HEAD)
    page = ui.column().classes("w-full max-w-screen-2xl mx-auto p-6 gap-4")
    run = await source.run(name)
    if run is None:
        with page, ui.card().classes("sonde-card p-6"):
            ui.label(f"No run named '{name}' in this store.").classes("text-lg")
            ui.link("Back to all runs", "/")
        return
    stored = await off_loop(source.store.get_graph, name)
    choices = Choices.from_available(await source.available(name))
    context = RunContext(source=source, name=name, run=run, choices=choices)
    graph = NetworkGraph(context, stored)
    context.panels = [graph]
    with page:
        graph.build()

    last = {"steps": run["steps"], "updated": run["updated_at"]}

    async def tick() -> None:
        now = await source.run(name)
        if now is None or (now["steps"], now["updated_at"]) == (last["steps"], last["updated"]):
            return
        last.update(steps=now["steps"], updated=now["updated_at"])
        await graph.refresh()

    ui.timer(0, graph.load, once=True)
    ui.timer(2.0, tick, immediate=False)
