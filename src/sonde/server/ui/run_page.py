"""The run page (``/run/{name}``): the run's header, then its panels, all refreshed live while it trains.

The panels are listed in :data:`sonde.server.ui.panels.RUN_PANELS` (alerts, loss and accuracy,
network overview heatmap, layers over training, distributions, layer similarity, the graph link),
one module each. The page draws its header and every panel's placeholders at once, loads the
panels after the browser connected (so the page appears immediately, and a slow chart never holds
up the others), and a one-second timer watches the run's last step: when it moves, new choices are
offered and every panel refreshes (a live update merges into a chart, so a zoom stays).
"""

from __future__ import annotations

import asyncio
from typing import Any

from nicegui import ui

from sonde.server.ui.data import Choices
from sonde.server.ui.layout import UIState, ago, frame, stamp, stat, status_color
from sonde.server.ui.panel import Panel, RunContext
from sonde.server.ui.panels import RUN_PANELS

__all__ = ["build_run_page", "layer_label"]


def layer_label(row: dict[str, Any]) -> str:
    """How a layer reads in the dashboard: its name, and its type when that says more.

    Example:
        >>> layer_label({"name": "2", "type": "ReLU"}), layer_label({"name": "fc1.relu", "type": "ReLU"})
        ('2 · ReLU', 'fc1.relu')
    """
    name, kind = str(row["name"]), str(row.get("type") or "")
    return f"{name} · {kind}" if kind and kind.lower() not in name.lower() else name


async def build_run_page(state: UIState, name: str) -> None:
    """Draw the run page for run ``name`` (or a not-found message).

    Example:
        >>> await build_run_page(state, "mlp-healthy")   # inside "/run/{name}"  # doctest: +SKIP
    """
    source = state.source
    frame(name)
    run = await source.run(name)
    page = ui.column().classes("w-full max-w-screen-2xl mx-auto p-6 gap-5")
    if run is None:
        with page, ui.card().classes("sonde-card p-6"):
            ui.label(f"No run named '{name}' in this store.").classes("text-lg")
            ui.link("Back to all runs", "/")
        return
    layer_rows, triples = await asyncio.gather(source.layers(name), source.available(name))
    context = RunContext(source=source, name=name, run=run, layer_rows=layer_rows,
                         labels={row["name"]: layer_label(row) for row in layer_rows},
                         choices=Choices.from_available(triples))
    context.panels = [panel(context) for panel in RUN_PANELS]
    header = [panel for panel in context.panels if panel.slot == "header"]

    with page:
        with ui.row().classes("w-full items-center gap-8"):
            with ui.column().classes("gap-0"):
                with ui.row().classes("items-center gap-3"):
                    ui.label(name).classes("text-2xl font-semibold")
                    badge = ui.badge(run["status"], color=status_color(run["status"])).props("rounded")
                ui.label(f"{run['model'] or 'model'} · {run['framework'] or 'framework'} · {len(layer_rows)} layers"
                         ).classes("sonde-muted")
            ui.space()
            for panel in header:
                panel.build()
            steps_label = stat("steps", run["steps"]).props("data-stat=steps")
            stat("started (UTC)", stamp(run["started_at"]))
            updated_label = stat("last update", ago(run["updated_at"]))
        for panel in context.panels:
            if panel not in header:
                panel.build()

    def wanted() -> list[Panel]:
        return [panel for panel in context.panels if panel.wanted(context.choices)]

    async def first_load() -> None:
        await asyncio.gather(*(panel.load() for panel in wanted()))

    async def refresh_choices() -> None:
        fresh = Choices.from_available(await source.available(name))
        if fresh == context.choices:
            return
        context.choices = fresh
        for panel in context.panels:
            panel.choices_changed()

    last = {"steps": run["steps"], "updated": run["updated_at"], "status": run["status"]}

    async def tick() -> None:
        now = await source.run(name)
        if now is None:
            return
        steps_label.text = str(now["steps"])
        updated_label.text = ago(now["updated_at"])
        if now["status"] != last["status"]:
            badge.text = now["status"]
            badge.props(f"color={status_color(now['status'])}")
        if (now["steps"], now["updated_at"], now["status"]) == (last["steps"], last["updated"], last["status"]):
            return
        last.update(steps=now["steps"], updated=now["updated_at"], status=now["status"])
        await refresh_choices()  # metrics that start later (eval, alerts, an evaluator's results) appear
        await asyncio.gather(*(panel.refresh() for panel in wanted()))

    ui.timer(0, first_load, once=True)
    ui.timer(1.0, tick, immediate=False)
