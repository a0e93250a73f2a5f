"""The graph page (``/run/{name}/graph``): the network's layered graph coloured by a metric over training.

Click a module box to expand it (click a box inside, or the frame's label, to collapse it again);
drag to pan, wheel to zoom; the slider and the play button move through the recorded steps. The
colour of a collapsed box is the mean (or max, as chosen) of its leaf layers. Alerts up to the
shown step ring their boxes in red. The page follows a live run: new steps extend the slider (and
are shown when the slider sat at the newest step), new alerts and metrics appear.

Example:
    >>> register_graph_page(state_of_request, gate)   # done by sonde.server.ui.attach  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import Request
from nicegui import ui

from sonde.graph.render import _is_dark
from sonde.server.ui.data import LOG_METRICS, Choices
from sonde.server.ui.graph_script import GRAPH_HEAD
from sonde.server.ui.graph_view import GraphView, draw, ramp
from sonde.server.ui.layout import UIState, frame
from sonde.server.ui.markup import escape
from sonde.server.ui.source import off_loop

__all__ = ["build_graph_page", "register_graph_page"]

_LATEST_LIMIT = 16  # metrics listed on a hover card


@dataclass
class _Colouring:
    topic: str = ""
    metric: str = ""
    phase: str = "train"
    how: str = "mean"
    log: bool = False
    column: int = 0
    heatmap: dict[str, Any] = field(default_factory=dict)
    latest: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)


def _scale(heatmap: dict[str, Any], log: bool) -> tuple[float, float]:
    values = [float(v) for row in heatmap.get("values") or [] for v in row
              if v is not None and math.isfinite(v) and (v > 0 or not log)]
    return (min(values), max(values)) if values else (0.0, 0.0)


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
    default = choices.heatmap_default() or ("", "")
    colour = _Colouring(topic=default[0], metric=default[1], log=default[1] in LOG_METRICS,
                        phase="train" if "train" in choices.phases or not choices.phases else choices.phases[0])
    holder: dict[str, GraphView | None] = {"view": None}
    canvas_id = "sonde-graph"

    with page:
        with ui.row().classes("w-full items-center gap-4"):
            with ui.column().classes("gap-0"):
                ui.label(f"{name} · network graph").classes("text-2xl font-semibold")
                summary = ui.label("").classes("sonde-muted").props("data-sg=summary")
            ui.space()
            ui.link("← run page", f"/run/{quote(name)}").classes("text-primary no-underline font-medium")
        with ui.card().classes("sonde-card gap-2"):
            with ui.row().classes("w-full items-center gap-3 px-1"):
                topic_select = ui.select(list(choices.layer_metrics), value=colour.topic or None, label="topic").props(
                    "dense outlined options-dense").classes("min-w-40")
                metric_select = ui.select(choices.layer_metrics.get(colour.topic, []), value=colour.metric or None,
                                          label="metric").props("dense outlined options-dense").classes("min-w-40")
                phase_select = ui.select(choices.phases or ["train"], value=colour.phase, label="phase").props(
                    "dense outlined options-dense").classes("min-w-28")
                how_select = ui.select({"mean": "box = mean of its layers", "max": "box = max of its layers"},
                                       value="mean", label="collapsed boxes").props(
                    "dense outlined options-dense").classes("min-w-52")
                log_switch = ui.switch("log colour", value=colour.log)
                ui.space()
                ui.button("Reset", on_click=lambda: reset()).props("flat dense no-caps icon=restart_alt")
                ui.button("Collapse all", on_click=lambda: collapse_all()).props("flat dense no-caps icon=unfold_less")
                ui.button("Fit", on_click=lambda: ui.run_javascript(f"sondeGraph.fit('{canvas_id}')")).props(
                    "flat dense no-caps icon=fit_screen")
            with ui.row().classes("w-full items-center gap-3 px-1 no-wrap"):
                play = ui.button(icon="play_arrow", on_click=lambda: toggle_play()).props(
                    "round dense unelevated color=primary data-sg=play")
                slider = ui.slider(min=0, max=1, value=0).props("data-sg=slider label-always=false").classes("flex-1")
                step_label = ui.label("step –").classes("text-sm font-medium min-w-28").props("data-sg=step")
            with ui.element("div").classes("sg-root").props(f"id={canvas_id}"):
                ui.element("div").classes("sg-canvas")
                ui.element("div").classes("sg-tip")
            with ui.row().classes("w-full items-center gap-3 px-1"):
                legend_low = ui.label("").classes("sonde-muted min-w-12 text-right").props("data-sg=low")
                ui.element("div").classes("sg-legend")
                legend_high = ui.label("").classes("sonde-muted min-w-12").props("data-sg=high")
                legend_text = ui.label("").classes("sonde-muted")
                ui.space()
                ui.label("click a box to expand · click inside a frame to collapse · drag to pan · wheel to zoom"
                         ).classes("sonde-muted")

    # -- colours ---------------------------------------------------------------------------------
    def steps() -> list[int]:
        return list(colour.heatmap.get("steps") or [])

    def paint() -> dict[str, Any]:
        view = holder["view"]
        if view is None:
            return {}
        all_steps = steps()
        column = min(colour.column, len(all_steps) - 1)
        values = view.values(colour.heatmap, column, colour.how) if column >= 0 else {}
        low, high = _scale(colour.heatmap, colour.log)
        fills: dict[str, list[str]] = {}
        for node, value in values.items():
            fill = ramp(value, low, high, log=colour.log)
            if fill is not None:
                fills[node] = [fill, "#ffffff" if _is_dark(fill) else "#1d2939"]
        step = all_steps[column] if column >= 0 else None
        alerts = view.alerts(colour.alerts, upto=step)
        rows = view.rows(colour.heatmap.get("layers") or [])
        latest = {key: view.values(h, 0, colour.how) for key, h in colour.latest.items() if h.get("steps")}
        tips: dict[str, str] = {}
        for leaf in view.visible().leaves():
            node = leaf.name
            lines = []
            if node in values:
                many = len(rows.get(node, [])) > 1
                lines.append(f"<span class='sg-k'>{escape(colour.topic)} · {escape(colour.metric)} at step "
                             f"{step}:</span> <b>{values[node]:.4g}</b>"
                             + (f" ({colour.how} of {len(rows[node])} layers)" if many else ""))
            known = [(k, v[node]) for k, v in latest.items() if node in v][:_LATEST_LIMIT]
            if known:
                lines.append("<span class='sg-k'>latest:</span> " + " · ".join(
                    f"{escape(t)}/{escape(m)} {v:.3g}" for (t, m), v in known))
            lines += [f"<span class='sg-bad'>⚠ {escape(text)}</span>" for text in alerts.get(node, [])[-3:]]
            tips[node] = view.tooltip(node, lines)
        step_label.text = f"step {step:,}" if step is not None else "no steps yet"
        legend_low.text, legend_high.text = (f"{low:.3g}", f"{high:.3g}") if values else ("", "")
        legend_text.text = (f"{colour.topic} · {colour.metric} ({colour.phase}{', log' if colour.log else ''}); "
                            f"scale over all steps" if colour.metric else "no per-layer metric recorded yet")
        return {"fills": fills, "tips": tips, "alerts": {k: len(v) for k, v in alerts.items()}}

    def send(*, layout: bool) -> None:
        view = holder["view"]
        if view is None:
            return
        payload = json.dumps(paint())
        if not layout:
            ui.run_javascript(f"sondeGraph.update('{canvas_id}', {payload})")
            return
        visible = view.visible()
        drawing = draw(visible, containers=sorted(view.collapsed & {n.name for n in visible.nodes}),
                       frames=view.frames())
        total = len(view.graph.leaves())
        model = view.graph.model or run["model"] or "model"
        summary.text = (f"{model} · {len(visible.leaves())} of {total} nodes shown"
                        f" · {len(view.collapsed)} modules collapsed")
        ui.run_javascript(f"sondeGraph.show('{canvas_id}', {json.dumps(drawing.svg)}, {payload}, false)")

    # -- data --------------------------------------------------------------------------------------
    async def load(*, follow: bool) -> None:
        at_end = colour.column >= len(steps()) - 1
        colour.heatmap = (await source.heatmap(name, colour.topic, colour.metric, phase=colour.phase)
                          if colour.topic and colour.metric else {})
        pairs = [(t, m) for t, ms in choices.layer_metrics.items() for m in ms][:_LATEST_LIMIT]
        latest = await asyncio.gather(*(source.heatmap(name, t, m, phase=colour.phase, max_steps=1) for t, m in pairs))
        colour.latest = dict(zip(pairs, latest, strict=True))
        colour.alerts = await source.alerts(name) if choices.has_alerts else []
        count = len(steps())
        slider.props["max"] = max(count - 1, 1)
        if follow or at_end or colour.column >= count:
            colour.column = max(count - 1, 0)
        slider.set_value(colour.column)

    async def first_show() -> None:
        if stored is None:
            summary.text = ("no graph stored for this run yet: the probe builds it at the first training step "
                            "(or the model could not be traced; the training log says why)")
            return
        try:
            holder["view"] = await off_loop(GraphView, stored)
        except Exception as exc:  # noqa: BLE001 - a malformed stored graph is said, never a traceback
            summary.text = f"the stored graph of this run cannot be drawn ({type(exc).__name__}: {str(exc)[:200]})"
            return
        await load(follow=True)
        send(layout=True)

    # -- handlers ------------------------------------------------------------------------------------
    def clicked(e: Any) -> None:
        view = holder["view"]
        args = e.args if isinstance(e.args, dict) else {}
        if view is None or args.get("id") != canvas_id:
            return
        try:
            if args.get("frame"):
                view.collapse(str(args["frame"]))
            elif not view.toggle(str(args.get("name", ""))):
                return
        except ValueError:
            return
        send(layout=True)

    def reset() -> None:
        if holder["view"] is not None:
            holder["view"].reset()
            send(layout=True)

    def collapse_all() -> None:
        if holder["view"] is not None:
            holder["view"].collapse_all()
            send(layout=True)

    def moved(e: Any) -> None:
        if e.value is None or int(e.value) == colour.column:
            return
        colour.column = int(e.value)
        send(layout=False)

    def advance() -> None:
        if colour.column >= len(steps()) - 1:
            toggle_play()
            return
        slider.set_value(colour.column + 1)

    player = ui.timer(0.3, advance, active=False)

    def toggle_play() -> None:
        if not player.active and colour.column >= len(steps()) - 1:
            slider.set_value(0)  # play from the start when the slider sits at the end
        player.active = not player.active
        play.props(f"icon={'pause' if player.active else 'play_arrow'}")

    async def recolour(follow: bool = False) -> None:
        await load(follow=follow)
        send(layout=False)

    async def topic_changed(e: Any) -> None:
        colour.topic = e.value or ""
        metrics = choices.layer_metrics.get(colour.topic, [])
        metric_select.set_options(metrics, value=colour.metric if colour.metric in metrics else
                                  (metrics[0] if metrics else None))

    async def metric_changed(e: Any) -> None:
        if e.value is None:
            return
        colour.metric = e.value
        if log_switch.value != (e.value in LOG_METRICS):
            log_switch.value = e.value in LOG_METRICS
        await recolour()

    async def phase_changed(e: Any) -> None:
        colour.phase = e.value
        await recolour(follow=True)

    def how_changed(e: Any) -> None:
        colour.how = e.value
        send(layout=False)

    def log_changed(e: Any) -> None:
        colour.log = bool(e.value)
        send(layout=False)

    ui.on("sonde_graph_click", clicked)
    slider.on_value_change(moved)
    topic_select.on_value_change(topic_changed)
    metric_select.on_value_change(metric_changed)
    phase_select.on_value_change(phase_changed)
    how_select.on_value_change(how_changed)
    log_switch.on_value_change(log_changed)

    last = {"steps": run["steps"], "updated": run["updated_at"]}

    async def tick() -> None:
        nonlocal stored, choices
        now = await source.run(name)
        if now is None or (now["steps"], now["updated_at"]) == (last["steps"], last["updated"]):
            return
        last.update(steps=now["steps"], updated=now["updated_at"])
        if holder["view"] is None:
            stored = await off_loop(source.store.get_graph, name)
            if stored is not None:
                await first_show()
            return
        choices = Choices.from_available(await source.available(name))
        if not colour.metric and choices.heatmap_default():
            colour.topic, colour.metric = choices.heatmap_default() or ("", "")
        topic_select.set_options(list(choices.layer_metrics), value=colour.topic or None)
        if not player.active:
            await recolour()

    ui.timer(0, first_show, once=True)
    ui.timer(2.0, tick, immediate=False)
