"""The run page (``/run/{name}``): network overview heatmap, training curves, per-layer lines,
histograms over time and alerts, all refreshed live while the run trains.

Each chart is a :class:`Panel`: it owns its selectors and its query, draws a placeholder at
once and loads its data after the browser connected (so the page appears immediately, and a
slow chart never holds up the others). A one-second timer watches the run's last step and
re-queries every panel when it moves; a live update merges into the chart, so a zoom stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from nicegui import ui

from sonde.server.ui.charts import heatmap_options, histogram_options, lines_options
from sonde.server.ui.data import LOG_METRICS, Choices, heatmap_budget, pick_changing, pick_layers
from sonde.server.ui.layout import UIState, ago, frame, stamp, stat, status_color
from sonde.server.ui.panel import Panel
from sonde.server.ui.similarity_panel import SimilarityPanel
from sonde.server.ui.source import off_loop

__all__ = ["build_run_page", "layer_label"]

log = logging.getLogger("sonde")

#: What an alert on a topic is about, for alerts stored without their text.
_ALERT_KINDS = {
    "activations": "dead units, saturation collapse or NaN/Inf",
    "weight_updates": "update ratio outside the healthy range",
}


@dataclass
class _View:
    """What one chart shows; the selectors write here, the loaders read."""

    topic: str = ""
    metric: str = ""
    phase: str = "train"
    log: bool = False
    layers: list[str] = field(default_factory=list)
    layer: str = ""
    topics: dict[str, str] = field(default_factory=dict)  # histogram side -> topic


def _wide(series: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether positive values span more than a factor of 20 (a log axis then reads better)."""
    values = [v for _, data in series for v in data.get("value", []) if v is not None and v > 0]
    return bool(values) and max(values) > 20 * min(values)


def layer_label(row: dict[str, Any]) -> str:
    """How a layer reads in the dashboard: its name, and its type when that says more.

    Example:
        >>> layer_label({"name": "2", "type": "ReLU"}), layer_label({"name": "fc1.relu", "type": "ReLU"})
        ('2 · ReLU', 'fc1.relu')
    """
    name, kind = str(row["name"]), str(row.get("type") or "")
    return f"{name} · {kind}" if kind and kind.lower() not in name.lower() else name


def _offer(select: ui.select, options: list[str], value: str) -> None:
    """New options for a selector, keeping its value when it is still offered."""
    select.set_options(options, value=value if value in options else None)


def _select(options: list[str] | dict[str, str], value: Any, label: str, **kw: Any) -> ui.select:
    # A run that has recorded nothing yet offers nothing: the selector starts empty, never invalid.
    value = value if value in options else None
    return ui.select(options, value=value, label=label, **kw).props("dense outlined options-dense").classes("min-w-40")


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
    choices = Choices.from_available(triples)
    layers = [row["name"] for row in layer_rows]
    labels = {row["name"]: layer_label(row) for row in layer_rows}

    with page:
        with ui.row().classes("w-full items-center gap-8"):
            with ui.column().classes("gap-0"):
                with ui.row().classes("items-center gap-3"):
                    ui.label(name).classes("text-2xl font-semibold")
                    badge = ui.badge(run["status"], color=status_color(run["status"])).props("rounded")
                ui.label(f"{run['model'] or 'model'} · {run['framework'] or 'framework'} · {len(layers)} layers"
                         ).classes("sonde-muted")
            ui.space()
            ui.button("Graph", icon="account_tree").props(
                f"outline no-caps data-link=graph href=/run/{quote(name)}/graph")
            steps_label = stat("steps", run["steps"]).props("data-stat=steps")
            stat("started (UTC)", stamp(run["started_at"]))
            updated_label = stat("last update", ago(run["updated_at"]))
        alerts_box = ui.column().classes("w-full")
        network_row = ui.row().classes("w-full gap-5 no-wrap")
        overview = ui.card().classes("sonde-card")
        lines_card = ui.card().classes("sonde-card")
        hist_card = ui.card().classes("sonde-card")

    panels: list[Panel] = []
    heat_ready = asyncio.Event()  # the first heatmap is in: the line chart picks its layers from it
    first_heatmap: dict[str, Any] = {}
    network_panels: dict[str, Panel] = {}

    # -- training curves (network-wide topics) -------------------------------------------
    def add_network_panels() -> list[Panel]:
        """A chart for loss and for accuracy once the run has them (also when they start later)."""
        added = []
        for topic, metric in (("loss", "loss"), ("outputs", "train_accuracy")):
            if metric in network_panels or metric not in choices.network_metrics.get(topic, ()):
                continue
            with network_row, ui.card().classes("sonde-card flex-1 min-w-0"):
                def load_network(topic: str = topic, metric: str = metric) -> Awaitable[dict[str, Any] | None]:
                    async def load() -> dict[str, Any] | None:
                        phases = [p for p in choices.phases if p in ("train", "eval")] or choices.phases
                        window = network_panels[metric].window
                        results = await asyncio.gather(*(source.series(name, "", topic, metric, phase=p,
                                                                       window=window) for p in phases))
                        series = [(p, r) for p, r in zip(phases, results, strict=True) if r.get("step")]
                        if not series:
                            return None
                        title = "loss" if metric == "loss" else "accuracy"
                        log = metric == "loss" and _wide(series)
                        return await off_loop(lines_options, series, title=title, log=log)
                    return load()

                network_panels[metric] = Panel(f"network-{metric}", "260px", load_network, zoomable=True)
            panels.append(network_panels[metric])
            added.append(network_panels[metric])
        return added

    add_network_panels()

    # -- overview heatmap --------------------------------------------------------------------
    default = choices.heatmap_default()
    heat = _View(topic=default[0] if default else "", metric=default[1] if default else "",
                 phase="train" if "train" in choices.phases or not choices.phases else choices.phases[0],
                 log=bool(default and default[1] in LOG_METRICS))
    with overview:
        with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
            ui.label("Network overview").classes("text-base font-semibold")
            ui.label("every layer (rows, forward order) × steps; click a cell to plot that layer below").classes(
                "sonde-muted")
            ui.space()
            topic_select = _select(list(choices.layer_metrics), heat.topic, "topic")
            metric_select = _select(choices.layer_metrics.get(heat.topic or "", []), heat.metric, "metric")
            phase_select = _select(choices.phases, heat.phase, "phase")
            log_switch = ui.switch("log colour", value=heat.log)
        rows = max(8, min(len(layers), 200))
        heat_height = f"{min(900, 90 + 18 * rows)}px"

        async def load_heatmap() -> dict[str, Any] | None:
            try:
                if not heat.topic or not heat.metric:
                    return None
                window = heat_panel.window
                data = await source.heatmap(name, heat.topic, heat.metric, phase=heat.phase,
                                            max_steps=heatmap_budget(len(layers)), window=window)
                first_heatmap.setdefault("data", data)
            finally:
                heat_ready.set()
            if not data.get("steps"):
                return None
            zoom = ""
            if window:
                zoom = f" · steps {window[0]:,}–{'newest' if window[1] is None else f'{window[1]:,}'} in detail"
            heat_panel.caption.text = f"{len(data['layers'])} layers × {len(data['steps'])} step columns{zoom}"
            return await off_loop(heatmap_options, data, title=f"{heat.topic} · {heat.metric}", log=heat.log,
                                  labels=labels, window=window)

        heat_panel = Panel("heatmap", heat_height, load_heatmap, on_click=lambda e: heat_clicked(e), zoomable=True)
        panels.append(heat_panel)

    # -- per-layer lines ----------------------------------------------------------------------
    line = _View(topic=heat.topic, metric=heat.metric, layers=pick_layers(layers), log=heat.log)
    with lines_card:
        with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
            ui.label("Layers over training").classes("text-base font-semibold")
            ui.space()
            line_topic = _select(list(choices.layer_metrics), line.topic, "topic")
            line_metric = _select(choices.layer_metrics.get(line.topic or "", []), line.metric, "metric")
            line_log = ui.switch("log y", value=bool(line.log))
        layer_select = ui.select(labels, value=line.layers, label="layers (several overlay)", multiple=True,
                                 with_input=True).props("dense outlined use-chips").classes("w-full px-2")

        async def load_lines() -> dict[str, Any] | None:
            chosen = list(line.layers or [])
            if not chosen or not line.topic or not line.metric:
                return None
            window = lines_panel.window
            results = await asyncio.gather(*(source.series(name, layer, line.topic, line.metric, phase=heat.phase,
                                                           window=window) for layer in chosen))
            series = [(labels.get(layer, layer), r) for layer, r in zip(chosen, results, strict=True) if r.get("step")]
            if not series:
                return None
            points = max(len(r["step"]) for _, r in series)
            zoom = ""
            if window:
                zoom = f" · steps {window[0]:,}–{'newest' if window[1] is None else f'{window[1]:,}'} in detail"
            lines_panel.caption.text = (f"{len(series)} layers · up to {points} points each "
                                        f"(min–max band where a point stands for several steps){zoom}")
            return await off_loop(lines_options, series, title=f"{line.topic} · {line.metric}", log=line.log)

        lines_panel = Panel("lines", "360px", load_lines, zoomable=True)
        panels.append(lines_panel)

    # -- histograms over time ------------------------------------------------------------------
    hist_topics = choices.histogram_topics
    hist_layers = [row["name"] for row in layer_rows if row["params"]] or layers
    left = choices.histogram_default() or "weights"  # a run without histograms yet may record them later
    right = "weight_grads" if left != "weight_grads" else next((t for t in hist_topics if t != left), "")
    hist = _View(layer=hist_layers[0] if hist_layers else "", topics={"left": left, "right": right})
    hist_panels: dict[str, Panel] = {}
    with hist_card:
        with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
            ui.label("Distributions over training").classes("text-base font-semibold")
            ui.label("histogram of each recorded step; colour = log count").classes("sonde-muted")
            ui.space()
            hist_layer = _select(labels, hist.layer, "layer", with_input=True)
        no_hist = ui.label("No histograms recorded in this run yet (the 'histogram' metric records them).")
        no_hist.classes("sonde-muted px-2").set_visibility(not hist_topics)
        hist_selects: dict[str, ui.select] = {}
        with ui.row().classes("w-full gap-4 no-wrap"):
            for side in ("left", "right"):
                if not hist.topics[side]:
                    continue
                with ui.column().classes("flex-1 min-w-0 gap-1"):
                    side_select = _select(hist_topics, hist.topics[side], "topic").classes("ml-2")
                    hist_selects[side] = side_select

                    def load_hist(side: str = side) -> Awaitable[dict[str, Any] | None]:
                        async def load() -> dict[str, Any] | None:
                            if not hist.layer or not hist.topics[side]:
                                return None
                            topic = hist.topics[side]
                            data = await source.histograms(name, hist.layer, topic, phase=heat.phase)
                            if not data.get("steps") or not data.get("edges"):
                                return None
                            title = f"{labels.get(hist.layer, hist.layer)} · {topic}"
                            return await off_loop(histogram_options, data, title=title)
                        return load()

                    panel = Panel(f"histogram-{side}", "320px", load_hist)
                    hist_panels[side] = panel
                    panels.append(panel)

                    def on_side(e: Any, side: str = side) -> None:
                        hist.topics[side] = e.value
                        ui.timer(0, hist_panels[side].redraw, once=True)

                    side_select.on_value_change(on_side)

    # -- alerts ------------------------------------------------------------------------------
    shown_alerts = {"count": -1}

    async def load_alerts() -> None:
        if not choices.has_alerts:
            return
        alerts = await source.alerts(name)
        if len(alerts) == shown_alerts["count"]:
            return
        shown_alerts["count"] = len(alerts)
        alerts_box.clear()
        if not alerts:
            return
        rows = [{**a, "what": a["message"] or _ALERT_KINDS.get(a["topic"], "NaN/Inf first seen here")} for a in alerts]
        with alerts_box, ui.card().classes("sonde-card").style("border-left: 4px solid #d62728"):
            with ui.row().classes("items-baseline gap-3 px-2"):
                ui.label(f"Alerts ({len(alerts)})").classes("text-base font-semibold text-negative")
                ui.label("where a problem started; the charts below show it").classes("sonde-muted")
            ui.table(columns=[{"name": k, "label": k, "field": k, "align": "left"}
                              for k in ("step", "layer", "topic", "what", "phase")],
                     rows=rows, pagination=5).props("flat dense data-view=alerts").classes("w-full")

    async def refresh_choices() -> None:
        nonlocal choices
        fresh = Choices.from_available(await source.available(name))
        if fresh == choices:
            return
        choices = fresh
        for panel in add_network_panels():
            ui.timer(0, panel.redraw, once=True)
        no_hist.set_visibility(not choices.histogram_topics)
        for side, select in hist_selects.items():
            _offer(select, choices.histogram_topics, hist.topics[side])
        _offer(phase_select, choices.phases, heat.phase)
        for view, topic, metric in ((heat, topic_select, metric_select), (line, line_topic, line_metric)):
            if not view.topic and choices.heatmap_default():  # the run had no per-layer metric yet
                view.topic, view.metric = choices.heatmap_default() or ("", "")
            _offer(topic, list(choices.layer_metrics), view.topic)
            _offer(metric, choices.layer_metrics.get(view.topic, []), view.metric)

    # -- selection handlers ----------------------------------------------------------------------
    def redraw(panel: Panel) -> None:
        ui.timer(0, panel.redraw, once=True)

    def follow_topic(view: Any, metric_choice: Any, topic: str) -> None:
        """A new topic: offer its metrics, keeping the view's metric when the topic has it too."""
        view.topic = topic
        metrics = choices.layer_metrics.get(topic, [])
        metric_choice.set_options(metrics, value=view.metric if view.metric in metrics else metrics[0])

    def follow_metric(view: Any, log_choice: Any, panel: Panel, metric: str | None) -> None:
        if metric is None:
            return
        view.metric = metric
        log_choice.value = metric in LOG_METRICS  # triggers its own redraw when it changes
        redraw(panel)

    def heat_topic(e: Any) -> None:
        follow_topic(heat, metric_select, e.value)

    def heat_metric(e: Any) -> None:
        follow_metric(heat, log_switch, heat_panel, e.value)

    def heat_log(e: Any) -> None:
        heat.log = bool(e.value)
        redraw(heat_panel)

    def heat_phase(e: Any) -> None:
        heat.phase = e.value
        for panel in panels:
            redraw(panel)

    topic_select.on_value_change(heat_topic)
    metric_select.on_value_change(heat_metric)
    log_switch.on_value_change(heat_log)
    phase_select.on_value_change(heat_phase)

    def line_topic_changed(e: Any) -> None:
        follow_topic(line, line_metric, e.value)

    def line_metric_changed(e: Any) -> None:
        follow_metric(line, line_log, lines_panel, e.value)

    def line_layers_changed(e: Any) -> None:
        line.layers = list(e.value or [])
        redraw(lines_panel)

    def line_log_changed(e: Any) -> None:
        line.log = bool(e.value)
        redraw(lines_panel)

    def hist_layer_changed(e: Any) -> None:
        hist.layer = e.value
        for panel in hist_panels.values():
            redraw(panel)

    line_topic.on_value_change(line_topic_changed)
    line_metric.on_value_change(line_metric_changed)
    layer_select.on_value_change(line_layers_changed)
    line_log.on_value_change(line_log_changed)
    hist_layer.on_value_change(hist_layer_changed)

    by_label = {label: layer for layer, label in labels.items()}

    def heat_clicked(e: Any) -> None:
        chart = heat_panel.chart
        if chart is None or not isinstance(e.data, list) or len(e.data) < 2:
            return
        names = chart.options.get("yAxis", {}).get("data", [])
        row = int(e.data[1])
        layer = by_label.get(names[row], names[row]) if 0 <= row < len(names) else None
        if layer and layer not in line.layers:
            layer_select.value = [*line.layers, layer]  # redraws through its handler
        if layer:
            hist_layer.value = layer

    with page:  # the layer × layer CKA matrix, shown once the run records one
        panels.append(SimilarityPanel(source, name, labels).panel)

    # -- first load, then live ---------------------------------------------------------------------
    async def first_load() -> None:
        async def lines_after_heatmap() -> None:
            try:
                await asyncio.wait_for(heat_ready.wait(), timeout=30)
            except asyncio.TimeoutError:
                pass
            moved = pick_changing(first_heatmap.get("data", {}))
            if moved and moved != line.layers and (line.topic, line.metric) == (heat.topic, heat.metric):
                layer_select.set_value(moved)  # its change handler redraws
            else:
                await lines_panel.redraw()

        await asyncio.gather(*(panel.redraw() for panel in panels if panel is not lines_panel), lines_after_heatmap())
        await load_alerts()

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
        await asyncio.gather(*(panel.refresh() for panel in panels))
        await load_alerts()

    ui.timer(0, first_load, once=True)
    ui.timer(1.0, tick, immediate=False)
