"""The graph page's panel: the network's layered graph coloured by a metric, played through training.

Click a module box to expand it (click a box inside, or the frame's label, to collapse it again);
drag to pan, wheel to zoom; the slider and the play button move through the recorded steps. The
colour of a collapsed box is the mean (or max, as chosen) of its leaf layers. Alerts up to the
shown step ring their boxes in red. The layout is :class:`~sonde.server.ui.graph_view.GraphView`'s;
the browser side is :data:`~sonde.server.ui.graph_script.GRAPH_HEAD`'s ``sondeGraph``.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from urllib.parse import quote

from nicegui import ui

from sonde.graph.render import is_dark
from sonde.server.ui.data import LOG_METRICS, Choices
from sonde.server.ui.graph_view import GraphView, draw, ramp
from sonde.server.ui.markup import escape
from sonde.server.ui.panel import Panel, RunContext
from sonde.server.ui.source import off_loop

__all__ = ["NetworkGraph"]

_LATEST_LIMIT = 16  # metrics listed on a hover card
CANVAS_ID = "sonde-graph"


def _scale(heatmap: dict[str, Any], log: bool) -> tuple[float, float]:
    values = [float(v) for row in heatmap.get("values") or [] for v in row
              if v is not None and math.isfinite(v) and (v > 0 or not log)]
    return (min(values), max(values)) if values else (0.0, 0.0)


class NetworkGraph(Panel):
    """The graph, its colouring controls, the step slider and the legend.

    Args:
        page: the run (``layer_rows`` unused).
        stored: the run's stored graph (``Store.get_graph``), or None when there is none yet.
    """

    title = "network graph"

    def __init__(self, page: RunContext, stored: dict[str, Any] | None) -> None:
        super().__init__(page)
        self.stored = stored
        choices = page.choices
        default = choices.heatmap_default() or ("", "")
        self.topic, self.metric = default
        self.log = default[1] in LOG_METRICS
        page.phase = "train" if "train" in choices.phases or not choices.phases else choices.phases[0]
        self.how = "mean"
        self.column = 0
        self.heatmap: dict[str, Any] = {}
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.alerts: list[dict[str, Any]] = []
        self.view: GraphView | None = None

    def build(self) -> None:
        page, choices = self.page, self.page.choices
        with ui.row().classes("w-full items-center gap-4"):
            with ui.column().classes("gap-0"):
                ui.label(f"{page.name} · {self.title}").classes("text-2xl font-semibold")
                self.summary = ui.label("").classes("sonde-muted").props("data-sg=summary")
            ui.space()
            ui.link("← run page", f"/run/{quote(page.name)}").classes("text-primary no-underline font-medium")
        with ui.card().classes("sonde-card gap-2"):
            with ui.row().classes("w-full items-center gap-3 px-1"):
                self.topic_select = ui.select(list(choices.layer_metrics), value=self.topic or None,
                                              label="topic").props("dense outlined options-dense").classes("min-w-40")
                self.metric_select = ui.select(choices.layer_metrics.get(self.topic, []), value=self.metric or None,
                                               label="metric").props("dense outlined options-dense").classes("min-w-40")
                self.phase_select = ui.select(choices.phases or ["train"], value=page.phase, label="phase").props(
                    "dense outlined options-dense").classes("min-w-28")
                self.how_select = ui.select({"mean": "box = mean of its layers", "max": "box = max of its layers"},
                                            value="mean", label="collapsed boxes").props(
                    "dense outlined options-dense").classes("min-w-52")
                self.log_switch = ui.switch("log colour", value=self.log)
                ui.space()
                ui.button("Reset", on_click=self._reset).props("flat dense no-caps icon=restart_alt")
                ui.button("Collapse all", on_click=self._collapse_all).props("flat dense no-caps icon=unfold_less")
                ui.button("Fit", on_click=lambda: ui.run_javascript(f"sondeGraph.fit('{CANVAS_ID}')")).props(
                    "flat dense no-caps icon=fit_screen")
            with ui.row().classes("w-full items-center gap-3 px-1 no-wrap"):
                self.play = ui.button(icon="play_arrow", on_click=self._toggle_play).props(
                    "round dense unelevated color=primary data-sg=play")
                self.slider = ui.slider(min=0, max=1, value=0).props("data-sg=slider label-always=false").classes(
                    "flex-1")
                self.step_label = ui.label("step –").classes("text-sm font-medium min-w-28").props("data-sg=step")
            with ui.element("div").classes("sg-root").props(f"id={CANVAS_ID}"):
                ui.element("div").classes("sg-canvas")
                ui.element("div").classes("sg-tip")
            with ui.row().classes("w-full items-center gap-3 px-1"):
                self.legend_low = ui.label("").classes("sonde-muted min-w-12 text-right").props("data-sg=low")
                ui.element("div").classes("sg-legend")
                self.legend_high = ui.label("").classes("sonde-muted min-w-12").props("data-sg=high")
                self.legend_text = ui.label("").classes("sonde-muted")
                ui.space()
                ui.label("click a box to expand · click inside a frame to collapse · drag to pan · wheel to zoom"
                         ).classes("sonde-muted")
        with ui.context.client.content:  # beside the page's column, not in it (a timer is an element)
            self.player = ui.timer(0.3, self._advance, active=False)
        ui.on("sonde_graph_click", self._clicked)
        self.slider.on_value_change(self._moved)
        self.topic_select.on_value_change(self._topic_changed)
        self.metric_select.on_value_change(self._metric_changed)
        self.phase_select.on_value_change(self._phase_changed)
        self.how_select.on_value_change(self._how_changed)
        self.log_switch.on_value_change(self._log_changed)

    # -- colours -----------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The steps of the colouring (the slider's positions)."""
        return list(self.heatmap.get("steps") or [])

    def paint(self) -> dict[str, Any]:
        """Fills, hover cards and alert rings of the visible boxes at the slider's step; sets the legend."""
        view = self.view
        if view is None:
            return {}
        all_steps = self.steps()
        column = min(self.column, len(all_steps) - 1)
        values = view.values(self.heatmap, column, self.how) if column >= 0 else {}
        low, high = _scale(self.heatmap, self.log)
        fills: dict[str, list[str]] = {}
        for node, value in values.items():
            fill = ramp(value, low, high, log=self.log)
            if fill is not None:
                fills[node] = [fill, "#ffffff" if is_dark(fill) else "#1d2939"]
        step = all_steps[column] if column >= 0 else None
        alerts = view.alerts(self.alerts, upto=step)
        rows = view.rows(self.heatmap.get("layers") or [])
        latest = {key: view.values(h, 0, self.how) for key, h in self.latest.items() if h.get("steps")}
        tips: dict[str, str] = {}
        for leaf in view.visible().leaves():
            node = leaf.name
            lines = []
            if node in values:
                many = len(rows.get(node, [])) > 1
                lines.append(f"<span class='sg-k'>{escape(self.topic)} · {escape(self.metric)} at step "
                             f"{step}:</span> <b>{values[node]:.4g}</b>"
                             + (f" ({self.how} of {len(rows[node])} layers)" if many else ""))
            known = [(k, v[node]) for k, v in latest.items() if node in v][:_LATEST_LIMIT]
            if known:
                lines.append("<span class='sg-k'>latest:</span> " + " · ".join(
                    f"{escape(t)}/{escape(m)} {v:.3g}" for (t, m), v in known))
            lines += [f"<span class='sg-bad'>⚠ {escape(text)}</span>" for text in alerts.get(node, [])[-3:]]
            tips[node] = view.tooltip(node, lines)
        self.step_label.text = f"step {step:,}" if step is not None else "no steps yet"
        self.legend_low.text, self.legend_high.text = (f"{low:.3g}", f"{high:.3g}") if values else ("", "")
        self.legend_text.text = (f"{self.topic} · {self.metric} ({self.page.phase}{', log' if self.log else ''}); "
                                 f"scale over all steps" if self.metric else "no per-layer metric recorded yet")
        return {"fills": fills, "tips": tips, "alerts": {k: len(v) for k, v in alerts.items()}}

    def send(self, *, layout: bool) -> None:
        """Send the colours to the browser, with a new drawing when ``layout`` (boxes expanded or collapsed)."""
        view = self.view
        if view is None:
            return
        payload = json.dumps(self.paint())
        if not layout:
            ui.run_javascript(f"sondeGraph.update('{CANVAS_ID}', {payload})")
            return
        visible = view.visible()
        drawing = draw(visible, containers=sorted(view.collapsed & {n.name for n in visible.nodes}),
                       frames=view.frames())
        total = len(view.graph.leaves())
        model = view.graph.model or self.page.run["model"] or "model"
        self.summary.text = (f"{model} · {len(visible.leaves())} of {total} nodes shown"
                             f" · {len(view.collapsed)} modules collapsed")
        ui.run_javascript(f"sondeGraph.show('{CANVAS_ID}', {json.dumps(drawing.svg)}, {payload}, false)")

    # -- data --------------------------------------------------------------------------------------
    async def _query(self, *, follow: bool) -> None:
        page = self.page
        at_end = self.column >= len(self.steps()) - 1
        self.heatmap = (await page.source.heatmap(page.name, self.topic, self.metric, phase=page.phase)
                        if self.topic and self.metric else {})
        pairs = [(t, m) for t, ms in page.choices.layer_metrics.items() for m in ms][:_LATEST_LIMIT]
        latest = await asyncio.gather(*(page.source.heatmap(page.name, t, m, phase=page.phase, max_steps=1)
                                        for t, m in pairs))
        self.latest = dict(zip(pairs, latest, strict=True))
        self.alerts = await page.source.alerts(page.name) if page.choices.has_alerts else []
        count = len(self.steps())
        self.slider.props["max"] = max(count - 1, 1)
        if follow or at_end or self.column >= count:
            self.column = max(count - 1, 0)
        self.slider.set_value(self.column)

    async def load(self) -> None:
        if self.stored is None:
            self.summary.text = ("no graph stored for this run yet: the probe builds it at the first training step "
                                 "(or the model could not be traced; the training log says why)")
            return
        try:
            self.view = await off_loop(GraphView, self.stored)
        except Exception as exc:  # noqa: BLE001 - a malformed stored graph is said, never a traceback
            self.summary.text = f"the stored graph of this run cannot be drawn ({type(exc).__name__}: {str(exc)[:200]})"
            return
        await self._query(follow=True)
        self.send(layout=True)

    async def refresh(self) -> None:
        page = self.page
        if self.view is None:
            self.stored = await off_loop(page.source.store.get_graph, page.name)
            if self.stored is not None:
                await self.load()
            return
        page.choices = Choices.from_available(await page.source.available(page.name))
        if not self.metric and page.choices.heatmap_default():
            self.topic, self.metric = page.choices.heatmap_default() or ("", "")
        self.topic_select.set_options(list(page.choices.layer_metrics), value=self.topic or None)
        if not self.player.active:
            await self._recolour()

    async def _recolour(self, follow: bool = False) -> None:
        await self._query(follow=follow)
        self.send(layout=False)

    # -- handlers ------------------------------------------------------------------------------------
    def _clicked(self, e: Any) -> None:
        view = self.view
        args = e.args if isinstance(e.args, dict) else {}
        if view is None or args.get("id") != CANVAS_ID:
            return
        try:
            if args.get("frame"):
                view.collapse(str(args["frame"]))
            elif not view.toggle(str(args.get("name", ""))):
                return
        except ValueError:
            return
        self.send(layout=True)

    def _reset(self) -> None:
        if self.view is not None:
            self.view.reset()
            self.send(layout=True)

    def _collapse_all(self) -> None:
        if self.view is not None:
            self.view.collapse_all()
            self.send(layout=True)

    def _moved(self, e: Any) -> None:
        if e.value is None or int(e.value) == self.column:
            return
        self.column = int(e.value)
        self.send(layout=False)

    def _advance(self) -> None:
        if self.column >= len(self.steps()) - 1:
            self._toggle_play()
            return
        self.slider.set_value(self.column + 1)

    def _toggle_play(self) -> None:
        if not self.player.active and self.column >= len(self.steps()) - 1:
            self.slider.set_value(0)  # play from the start when the slider sits at the end
        self.player.active = not self.player.active
        self.play.props(f"icon={'pause' if self.player.active else 'play_arrow'}")

    async def _topic_changed(self, e: Any) -> None:
        self.topic = e.value or ""
        metrics = self.page.choices.layer_metrics.get(self.topic, [])
        self.metric_select.set_options(metrics, value=self.metric if self.metric in metrics else
                                       (metrics[0] if metrics else None))

    async def _metric_changed(self, e: Any) -> None:
        if e.value is None:
            return
        self.metric = e.value
        if self.log_switch.value != (e.value in LOG_METRICS):
            self.log_switch.value = e.value in LOG_METRICS
        await self._recolour()

    async def _phase_changed(self, e: Any) -> None:
        self.page.phase = e.value
        await self._recolour(follow=True)

    def _how_changed(self, e: Any) -> None:
        self.how = e.value
        self.send(layout=False)

    def _log_changed(self, e: Any) -> None:
        self.log = bool(e.value)
        self.send(layout=False)
