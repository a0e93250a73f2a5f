"""The runs page (``/``): every run in the store, refreshed every second over the websocket.

A run's status is ``running``, ``finished``, ``failed``, or ``stalled``: running, but its writer
has given no sign of life (heartbeat) for a while, e.g. a killed process (``sonde.store.status``).

Example:
    >>> row = table_row({"name": "mlp", "model": "Sequential", "framework": "torch", "status": "running",
    ...                  "steps": 12, "started_at": 0.0, "updated_at": 0.0, "ended_at": None}, now=5.0)
    >>> row["updated"]
    '5 s ago'
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from nicegui import ui

from sonde.server.ui.layout import UIState, ago, frame, stamp, status_color

__all__ = ["build_runs_page", "table_row"]

_COLUMNS: list[dict[str, Any]] = [
    {"name": "name", "label": "Run", "field": "name", "align": "left", "sortable": True},
    {"name": "model", "label": "Model", "field": "model", "align": "left", "sortable": True},
    {"name": "framework", "label": "Framework", "field": "framework", "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "align": "left", "sortable": True},
    {"name": "steps", "label": "Steps", "field": "steps", "align": "right", "sortable": True},
    {"name": "started", "label": "Started (UTC)", "field": "started", "align": "left", "sortable": True},
    {"name": "updated", "label": "Last update", "field": "updated", "align": "left"},
    {"name": "alerts", "label": "Alerts", "field": "alerts", "align": "left", "sortable": True},
]


def table_row(run: dict[str, Any], *, now: float | None = None, alerts: int = 0) -> dict[str, Any]:
    """One run as a row of the runs table (times formatted for reading)."""
    return {
        "alerts": alerts,
        "name": run["name"], "href": f"/run/{quote(run['name'], safe='')}", "model": run["model"] or "–",
        "framework": run["framework"] or "–", "status": run["status"], "color": status_color(run["status"]),
        "steps": run["steps"], "started": stamp(run["started_at"]), "updated": ago(run["updated_at"], now=now),
        "alive": ago(run.get("heartbeat_at"), now=now),
    }


async def build_runs_page(state: UIState) -> None:
    """Draw the runs table and keep it current.

    Example:
        >>> await build_runs_page(state)   # inside the "/" page  # doctest: +SKIP
    """
    frame("Runs")
    with ui.column().classes("w-full max-w-screen-xl mx-auto p-6 gap-4"):
        with ui.row().classes("w-full items-end"):
            with ui.column().classes("gap-0"):
                ui.label("Runs").classes("text-2xl font-semibold")
                summary = ui.label("").classes("sonde-muted")
            ui.space()
            compare = ui.button("Compare selected", icon="stacked_line_chart").props("unelevated disable")
        with ui.card().classes("sonde-card p-0"):
            table = ui.table(columns=_COLUMNS, rows=[], row_key="name", selection="multiple",
                             pagination={"rowsPerPage": 25, "sortBy": "started", "descending": True})
            table.classes("w-full").props("flat data-view=runs")
            table.add_slot("body-cell-name", """
                <q-td :props="props"><a :href="props.row.href" class="text-primary font-medium no-underline"
                   data-run-link>{{ props.value }}</a></q-td>""")
            table.add_slot("body-cell-alerts", """
                <q-td :props="props"><q-badge v-if="props.value > 0" color="red-7" rounded
                   :label="props.value + (props.value === 1 ? ' alert' : ' alerts')" /></q-td>""")
            table.add_slot("body-cell-status", """
                <q-td :props="props"><q-badge :color="props.row.color" :label="props.value" rounded
                   :title="'last sign of life ' + props.row.alive" /></q-td>""")
            table.add_slot("no-data", """
                <div class="full-width text-center q-pa-lg text-grey-7">No runs yet. Train with
                <code>sonde.probe(model, run="my-run")</code> or run <code>sonde demo</code>.</div>""")

    def selection_changed() -> None:
        names = [row["name"] for row in table.selected]
        compare.props(remove="disable") if len(names) >= 1 else compare.props("disable")

    def open_compare() -> None:
        names = ",".join(quote(row["name"], safe="") for row in table.selected)
        ui.navigate.to(f"/compare?runs={names}")

    table.on_select(lambda _: selection_changed())
    compare.on_click(open_compare)

    counts: dict[str, int] = {}
    ticks = {"n": 0}

    async def refresh() -> None:
        runs = await state.source.runs()
        if ticks["n"] % 5 == 0:  # alert counts every 5 s: they change rarely
            counts.clear()
            counts.update(await state.source.alert_counts([r["name"] for r in runs]))
        ticks["n"] += 1
        table.rows = [table_row(r, alerts=counts.get(r["name"], 0)) for r in runs]
        table.update()
        running = sum(r["status"] == "running" for r in runs)
        stalled = sum(r["status"] == "stalled" for r in runs)  # running, but no sign of life for a while
        summary.text = (f"{len(runs)} run{'s' * (len(runs) != 1)} · {running} running"
                        f"{f' · {stalled} stalled' if stalled else ''} · updates live")

    await refresh()
    ui.timer(1.0, refresh, immediate=False)
