"""The run page's "Layer similarity (CKA)" panel: the layer × layer CKA matrix at a chosen step.

Shown only once the run has ``cka_matrix:*`` Records (``metrics=["cka_matrix"]`` with a
``probe_set=``); until then the card stays hidden, and it appears by itself when a live run
records its first matrix. A slider picks one of the steps where the matrix was computed;
it follows the latest step (new ones appear while the run trains) until the user moves it
back, and follows again once moved to the right end.

The data comes from :meth:`Store.matrix` (one step's cells, by index) on a worker thread;
the chart options from :func:`sonde.server.ui.similarity.matrix_options`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from nicegui import background_tasks, ui

from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.panel import Panel, RunContext
from sonde.server.ui.similarity import CKA_PREFIX, CKA_TOPIC, matrix_options, matrix_phases, matrix_size, matrix_step
from sonde.server.ui.source import off_loop

__all__ = ["LayerSimilarity"]


class LayerSimilarity(Panel):
    """The CKA matrix card of one run page (hidden until the run records a matrix)."""

    title = "Layer similarity (CKA)"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        self.source = page.source
        self.run = page.name
        self.labels: Mapping[str, str] = page.labels
        self.steps: list[int] = []
        self.shown: int | None = None
        self.asked: int | None = None  # the step the user chose; None: follow the latest step
        self.phase = "train"
        self._due = False

    def build(self) -> None:
        self.card = ui.card().classes("sonde-card").props("data-view=similarity")
        self.card.set_visibility(False)
        with self.card:
            with ui.row().classes("w-full items-center gap-3 px-2 pt-1"):
                ui.label(self.title).classes("text-base font-semibold")
                ui.label("linear CKA of every pair of layers on the probe set (rows and columns in forward "
                         "order; 1 = same representation up to rotation and scale)").classes("sonde-muted")
                ui.space()
                self.phase_select = ui.select([], label="phase").props("dense outlined options-dense").classes(
                    "min-w-28")
                self.phase_select.set_visibility(False)
                self.phase_select.on_value_change(self._phase_changed)
            with ui.row().classes("w-full items-center gap-4 px-2 no-wrap"):
                self.step_label = ui.label("").classes("text-sm whitespace-nowrap").props("data-similarity=step")
                self.slider = ui.slider(min=0, max=1, step=1, value=0).classes("flex-1 max-w-2xl").props(
                    "markers snap data-similarity=slider")
                self.slider.on_value_change(self._slid)
            self.chart = LiveChart("similarity", "420px", self._load)
        self.charts = [self.chart]

    async def _load(self) -> dict[str, Any] | None:
        phases = matrix_phases(await self.source.available(self.run))
        self.card.set_visibility(bool(phases))
        if not phases:
            return None
        if self.phase not in phases:
            self.phase = phases[0]
        self.phase_select.set_options(phases, value=self.phase)
        self.phase_select.set_visibility(len(phases) > 1)
        data = await off_loop(self.source.store.matrix, self.run, CKA_TOPIC, CKA_PREFIX, phase=self.phase,
                              step=self.asked)
        if not data["layers"] or data["step"] is None:
            return None
        self.steps, self.shown = [int(s) for s in data["steps"]], int(data["step"])
        self._show_steps()
        names = [self.labels.get(layer, layer) for layer in data["layers"]]
        width, height = matrix_size(len(names), names)
        # Square cells: LiveChart styles a new chart "height: <chart.height>", so the width rides along.
        self.chart.height = f"{height}px; max-width: {width}px"
        if self.chart.chart is not None:  # a live merge keeps the element: size it here
            self.chart.chart.style(f"height: {height}px; max-width: {width}px")
        self.chart.caption.text = f"{len(names)} layers · {len(self.steps)} steps with a matrix"
        options = await off_loop(matrix_options, data, title="CKA", labels=self.labels)
        return options

    def _show_steps(self) -> None:
        """Slider range and position, and the step label, for the current steps."""
        index = self.steps.index(self.shown) if self.shown in self.steps else len(self.steps) - 1
        last = max(0, len(self.steps) - 1)
        if self.slider.props["max"] != max(1, last):
            self.slider.props["max"] = max(1, last)  # an ObservableDict: the browser gets the change
        self.slider.set_enabled(last > 0)
        if self.slider.value != index:
            self.slider.set_value(index)  # _slid sees the step already shown and does nothing
        latest = " (latest)" if self.asked is None else ""
        first, final = self.steps[0], self.steps[-1]
        self.step_label.text = f"step {self.shown}{latest} · {len(self.steps)} computed, {first}…{final}"

    def _slid(self, e: Any) -> None:
        if not self.steps or e.value is None:
            return
        index = max(0, min(int(e.value), len(self.steps) - 1))
        self.asked = None if index == len(self.steps) - 1 else self.steps[index]
        if matrix_step(self.steps, self.shown, self.asked) == self.shown:
            return
        if not self._due:  # one query per burst of slider events (a drag sends many)
            self._due = True
            background_tasks.create(self._apply(), name=f"sonde similarity step {self.run}")

    async def _apply(self) -> None:
        await asyncio.sleep(0.15)
        self._due = False
        await self.chart.redraw()  # waits for a running query, unlike refresh: the choice is never lost

    def _phase_changed(self, e: Any) -> None:
        if e.value and e.value != self.phase:
            self.phase, self.asked = e.value, None
            ui.timer(0, self.chart.redraw, once=True)
