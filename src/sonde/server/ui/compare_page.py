"""The comparison page (``/compare?runs=a,b``): one metric of one layer, several runs overlaid.

Example: ``/compare?runs=mlp-healthy,mlp-lr-too-high&topic=loss&metric=loss`` overlays two losses.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nicegui import ui

from sonde.server.ui.charts import lines_options
from sonde.server.ui.data import LOG_METRICS, NETWORK_TOPICS, Choices
from sonde.server.ui.layout import UIState, frame
from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.source import off_loop

__all__ = ["build_compare_page"]

_NETWORK = "(network)"


def _series_label(topic: str | None, metric: str | None) -> str:
    """``activations · zero_frac``; just ``loss`` when topic and metric agree."""
    return str(metric) if topic == metric else f"{topic} · {metric}"


async def build_compare_page(state: UIState, runs: list[str], params: dict[str, str]) -> None:
    """Draw the comparison page for the runs named in the query (all runs may be picked).

    Example:
        >>> await build_compare_page(state, ["a", "b"], {"topic": "loss", "metric": "loss"})  # doctest: +SKIP
    """
    source = state.source
    frame("Compare runs")
    all_runs = [r["name"] for r in await source.runs()]
    chosen = [r for r in runs if r in all_runs] or all_runs[-2:]
    sel: dict[str, Any] = {"runs": chosen, "topic": params.get("topic"), "metric": params.get("metric"),
                           "layer": params.get("layer", ""), "phase": params.get("phase", "train"), "log": None}
    options: dict[str, Any] = {}

    async def refresh_options() -> None:
        triples: set[tuple[str, str, str]] = set()
        layer_names: list[str] = []
        for run_name in sel["runs"]:
            triples.update(await source.available(run_name))
            layer_names += [r["name"] for r in await source.layers(run_name) if r["name"] not in layer_names]
        choices = Choices.from_available(triples)
        series = choices.all_series()
        options["series"] = {_series_label(t, m): (t, m) for t, m in series}
        options["layers"] = {"": _NETWORK, **{n: n for n in layer_names}}
        options["phases"] = choices.phases or ["train"]
        if (sel["topic"], sel["metric"]) not in series and series:
            preferred = [p for p in (("loss", "loss"), ("outputs", "train_accuracy")) if p in series]
            sel["topic"], sel["metric"] = (preferred or series)[0]
        if sel["log"] is None:
            sel["log"] = sel["metric"] in LOG_METRICS or sel["metric"] == "loss"

    await refresh_options()

    with ui.column().classes("w-full max-w-screen-2xl mx-auto p-6 gap-4"):
        ui.label("Compare runs").classes("text-2xl font-semibold")
        with ui.card().classes("sonde-card"):
            with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
                run_select = ui.select(all_runs, value=sel["runs"], label="runs", multiple=True, with_input=True)
                run_select.props("dense outlined use-chips").classes("min-w-80 flex-1")
                key = _series_label(sel["topic"], sel["metric"])
                series_select = ui.select(list(options["series"]), value=key if key in options["series"] else None,
                                          label="metric", with_input=True).props("dense outlined").classes("min-w-56")
                layer_select = ui.select(options["layers"], value=sel["layer"] if sel["layer"] in options["layers"]
                                         else "", label="layer", with_input=True).props("dense outlined")
                layer_select.classes("min-w-48")
                phase = sel["phase"] if sel["phase"] in options["phases"] else options["phases"][0]
                phase_select = ui.select(options["phases"], value=phase, label="phase").props("dense outlined")
                phase_select.classes("min-w-28")
                log_switch = ui.switch("log y", value=bool(sel["log"]))

            async def load() -> dict[str, Any] | None:
                if not sel["runs"] or not sel["topic"] or not sel["metric"]:
                    return None
                results = await asyncio.gather(*(source.series(r, sel["layer"] or "", sel["topic"], sel["metric"],
                                                               phase=sel["phase"], window=panel.window)
                                                 for r in sel["runs"]))
                series = [(r, data) for r, data in zip(sel["runs"], results, strict=True) if data.get("step")]
                if not series:
                    return None
                where = sel["layer"] or "network"
                panel.caption.text = f"{len(series)} of {len(sel['runs'])} runs have {sel['metric']} for {where}"
                title = f"{where} · {sel['topic']} · {sel['metric']} ({sel['phase']})"
                return await off_loop(lines_options, series, title=title, log=bool(sel["log"]))

            panel = LiveChart("compare", "460px", load, zoomable=True)

    def redraw() -> None:
        ui.timer(0, panel.redraw, once=True)

    async def runs_changed(e: Any) -> None:
        sel["runs"] = list(e.value or [])
        await refresh_options()
        label = _series_label(sel["topic"], sel["metric"])
        series_select.set_options(list(options["series"]), value=label if label in options["series"] else None)
        layer_select.set_options(options["layers"], value=sel["layer"] if sel["layer"] in options["layers"] else "")
        redraw()

    def series_changed(e: Any) -> None:
        if e.value in options["series"]:
            sel["topic"], sel["metric"] = options["series"][e.value]
            layers = [n for n in options["layers"] if n]
            if sel["topic"] in NETWORK_TOPICS:
                layer_select.value = ""
            elif not sel["layer"] and layers:
                layer_select.value = layers[0]
            redraw()

    def layer_changed(e: Any) -> None:
        sel["layer"] = e.value or ""
        redraw()

    def phase_changed(e: Any) -> None:
        sel["phase"] = e.value
        redraw()

    def log_changed(e: Any) -> None:
        sel["log"] = bool(e.value)
        redraw()

    run_select.on_value_change(runs_changed)
    series_select.on_value_change(series_changed)
    layer_select.on_value_change(layer_changed)
    phase_select.on_value_change(phase_changed)
    log_switch.on_value_change(log_changed)
    ui.timer(0, panel.redraw, once=True)
    ui.timer(2.0, panel.refresh, immediate=False)
