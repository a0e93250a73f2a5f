"""The run page's training curves: the network's loss and accuracy over steps, train and eval overlaid.

A chart appears for each once the run records it (``loss · loss``, ``outputs · train_accuracy``),
also when that starts later in a live run; the two sit side by side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from nicegui import ui

from sonde.server.ui.charts import lines_options
from sonde.server.ui.data import Choices
from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.panel import Panel, RunContext
from sonde.server.ui.source import off_loop

__all__ = ["TrainingCurves", "wide"]

#: (topic, metric) of each curve, in the order they sit in the row.
CURVES = (("loss", "loss"), ("outputs", "train_accuracy"))


def wide(series: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether positive values span more than a factor of 20 (a log axis then reads better).

    Example:
        >>> wide([("train", {"value": [0.1, 5.0]})]), wide([("train", {"value": [1.0, 2.0, None]})])
        (True, False)
    """
    values = [v for _, data in series for v in data.get("value", []) if v is not None and v > 0]
    return bool(values) and max(values) > 20 * min(values)


class TrainingCurves(Panel):
    """A row of network-wide curves: loss and accuracy, each once the run has it."""

    title = "Training curves"

    def __init__(self, page: RunContext) -> None:
        super().__init__(page)
        self.by_metric: dict[str, LiveChart] = {}

    def wanted(self, choices: Choices) -> bool:
        return any(metric in choices.network_metrics.get(topic, ()) for topic, metric in CURVES)

    def build(self) -> None:
        self.row = ui.row().classes("w-full gap-5 no-wrap")
        self._add_curves()

    def _add_curves(self) -> list[LiveChart]:
        """A chart for each curve the run has and the row has not yet."""
        added = []
        for topic, metric in CURVES:
            if metric in self.by_metric or metric not in self.page.choices.network_metrics.get(topic, ()):
                continue
            with self.row, ui.card().classes("sonde-card flex-1 min-w-0"):
                self.by_metric[metric] = LiveChart(f"network-{metric}", "260px", self._loader(topic, metric),
                                                   zoomable=True)
            self.charts.append(self.by_metric[metric])
            added.append(self.by_metric[metric])
        return added

    def _loader(self, topic: str, metric: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
        async def load() -> dict[str, Any] | None:
            page = self.page
            phases = [p for p in page.choices.phases if p in ("train", "eval")] or page.choices.phases
            window = self.by_metric[metric].window
            results = await asyncio.gather(*(page.source.series(page.name, "", topic, metric, phase=p, window=window)
                                             for p in phases))
            series = [(p, r) for p, r in zip(phases, results, strict=True) if r.get("step")]
            if not series:
                return None
            title = "loss" if metric == "loss" else "accuracy"
            log = metric == "loss" and wide(series)
            return await off_loop(lines_options, series, title=title, log=log)

        return load

    def choices_changed(self) -> None:
        for chart in self._add_curves():
            ui.timer(0, chart.redraw, once=True)
