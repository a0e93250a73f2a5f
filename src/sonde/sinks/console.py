"""Console sink: a live per-layer table on a terminal, plain log lines everywhere else."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sonde.records import NETWORK, Record
from sonde.run_info import RunInfo
from sonde.sinks.base import Sink

__all__ = ["ConsoleSink"]

_TABLE_TOPIC = "activations"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class _StepRateColumn(ProgressColumn):
    """Steps per second; rich's own speed column counts bytes."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("? steps/s" if speed is None else f"{speed:.3g} steps/s", style="progress.data.speed")


class ConsoleSink(Sink):
    """Shows training progress on the console.

    On a terminal: a rich ``Live`` display, refreshed by rich's own thread at most
    ``refresh_per_second`` times a second, with the latest network-wide values (loss first),
    a progress bar of steps and a table with one row per layer (first-seen order) and one
    column per metric in ``metrics`` of the ``activations`` topic.
    Elsewhere (pipes, CI, pytest): a plain line such as
    ``step 120  loss 0.4123  train_accuracy 0.91`` at most every :attr:`log_interval`
    seconds, and one final line on :meth:`close`.

    Only scalar records are shown; arrays and non-finite values never make it raise. Alerts
    (records with a ``message``) are printed as they arrive, one line each:
    ``ALERT step 120 fc1/activations: layer 'fc1': 97% of its activations are exactly zero ...``.

    Args:
        total: Number of steps the run will take, for the progress bar; ``None`` if unknown.
        refresh_per_second: Upper bound on live redraws per second.
        metrics: Metrics of the ``activations`` topic shown as table columns.
        stream: Where to write: a text stream, or a ``rich.console.Console``; ``sys.stdout`` by default.

    Example:
        >>> sink = ConsoleSink(total=1000)                  # doctest: +SKIP
        >>> sink.open(RunInfo(name="mlp"))                  # doctest: +SKIP
        >>> sink.write([Record("mlp", 0, "train", "", "loss", "loss", 2.3)])  # doctest: +SKIP
        >>> sink.close()                                    # doctest: +SKIP
    """

    name = "console"
    shows_alerts = True  # its ALERT line replaces the probe's log line
    #: Seconds between two plain log lines when not on a terminal.
    log_interval = 2.0

    def __init__(
        self,
        total: int | None = None,
        refresh_per_second: float = 4,
        metrics: Sequence[str] = ("mean", "std", "norm", "zero_frac"),
        stream: TextIO | Console | None = None,
    ) -> None:
        self.total = total
        self.refresh_per_second = refresh_per_second
        self.metrics = tuple(metrics)
        self.stream = stream
        self.console: Console | None = None
        self._run = ""
        self._lock = threading.Lock()
        self._step: int | None = None
        self._network: dict[str, float] = {}
        self._layers: dict[str, dict[str, float]] = {}
        self._live: Live | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_line = -math.inf

    @property
    def live(self) -> bool:
        """Whether the sink draws a live display (the console is a terminal)."""
        return self._live is not None

    def open(self, run: RunInfo) -> None:
        self._run = run.name
        if isinstance(self.stream, Console):
            self.console = self.stream
        else:
            # Resolved here, not at import, so that redirected/captured stdout is honoured.
            self.console = Console(file=self.stream if self.stream is not None else sys.stdout)
        if not self.console.is_terminal:
            return
        self._progress = Progress(
            BarColumn(), MofNCompleteColumn(), _StepRateColumn(), TimeElapsedColumn(),
            console=self.console, auto_refresh=False,
        )
        self._task = self._progress.add_task(run.name, total=self.total, completed=run.first_step)
        # Swapping sys.stdout is only right when the display is on the process's own stdout/stderr.
        redirect = self.console.file in (sys.stdout, sys.stderr)
        self._live = Live(
            console=self.console, refresh_per_second=self.refresh_per_second, get_renderable=self._render,
            redirect_stdout=redirect, redirect_stderr=redirect,
        )
        self._live.start()

    def write(self, records: Sequence[Record]) -> None:
        with self._lock:
            for record in records:
                self._absorb(record)
            step = self._step
        for record in records:
            if record.message:
                self._print_alert(record)
        if step is None:
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step + 1)
        elif self._live is None and time.monotonic() - self._last_line >= self.log_interval:
            self._print_line(self._summary_line())

    def flush(self) -> None:
        if self._live is not None:
            self._live.refresh()
        elif self.console is not None:
            self.console.file.flush()

    def close(self, status: str = "finished") -> None:
        if self._live is not None:
            self._live.stop()  # draws the final state once more and leaves it on screen
            self._live = None
            if status != "finished":
                self.console.print(f"run {self._run!r} {status}", markup=False, highlight=False)  # type: ignore[union-attr]
        elif self.console is not None:
            line = self._summary_line() if self._step is not None else "no steps recorded"
            self._print_line(f"{line}  ({status})")

    def _print_alert(self, record: Record) -> None:
        where = "/".join(p for p in (record.layer, record.topic) if p)
        phase = "" if record.phase == "train" else f" ({record.phase})"
        line = f"ALERT step {record.step}{phase} {where}: {record.message}"
        if self._live is not None:
            self._live.console.print(Text(line, style="bold red"))
        elif self.console is not None:
            self._print_line(line)

    def _absorb(self, record: Record) -> None:
        if isinstance(record.value, np.ndarray) or record.message:
            return
        try:
            value = float(record.value)
        except (TypeError, ValueError):
            return
        if record.phase == "train":  # an eval pass is filed at the next step: it must not advance progress
            self._step = record.step if self._step is None else max(self._step, record.step)
        if record.layer == NETWORK:
            if record.topic == "outputs" and record.metric != "train_accuracy":
                return  # statistics of the logits would crowd out loss and accuracy
            metric = "accuracy" if record.phase != "train" and record.metric == "train_accuracy" else record.metric
            label = metric if record.phase == "train" else f"{record.phase}/{metric}"
            self._network[label] = value
        elif record.phase == "train":
            # Every probed layer gets its row at first sight, even before its activations arrive.
            row = self._layers.setdefault(record.layer, {})
            if record.topic == _TABLE_TOPIC:
                row[record.metric] = value

    def _network_items(self) -> list[tuple[str, float]]:
        # Loss first: it is the one number everybody looks for.
        return sorted(self._network.items(), key=lambda item: item[0] != "loss")

    def _summary_line(self) -> str:
        with self._lock:
            parts = [f"step {self._step}"] + [f"{k} {_fmt(v)}" for k, v in self._network_items()]
        return "  ".join(parts)

    def _print_line(self, line: str) -> None:
        assert self.console is not None
        self._last_line = time.monotonic()
        self.console.file.write(line + "\n")
        self.console.file.flush()

    def _render(self) -> RenderableType:
        with self._lock:
            header = Text(f"sonde · {self._run}   step {self._step if self._step is not None else '-'}")
            for label, value in self._network_items():
                header.append(f"   {label} ", style="bold" if label == "loss" else "")
                header.append(_fmt(value), style="bold cyan" if label == "loss" else "cyan")
            table = Table(title=f"{_TABLE_TOPIC}", title_justify="left", expand=False)
            table.add_column("layer", style="bold")
            for metric in self.metrics:
                table.add_column(metric, justify="right")
            for layer, values in self._layers.items():
                table.add_row(layer, *(_fmt(values[m]) if m in values else "-" for m in self.metrics))
        parts: list[RenderableType] = [header]
        if self._progress is not None:
            parts.append(self._progress)
        parts.append(table)
        return Group(*parts)
