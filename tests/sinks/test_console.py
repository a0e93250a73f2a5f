"""ConsoleSink: plain log lines off a terminal, a live rich table on one."""

from __future__ import annotations

from io import StringIO

import numpy as np
from rich.console import Console

from sonde.records import Record
from sonde.sinks.base import RunInfo, SinkRunner
from sonde.sinks.console import ConsoleSink

RUN = "mlp"


def _loss(step: int, value: float, phase: str = "train") -> Record:
    return Record(RUN, step, phase, "", "loss", "loss", value)


def _act(step: int, layer: str, metric: str, value: float) -> Record:
    return Record(RUN, step, "train", layer, "activations", metric, value)


def test_plain_lines_when_not_a_terminal() -> None:
    stream = StringIO()
    sink = ConsoleSink(stream=stream)
    sink.open(RunInfo(name=RUN))
    assert not sink.live
    sink.write([_loss(120, 0.41234), Record(RUN, 120, "train", "", "outputs", "train_accuracy", 0.91)])
    # Within the log interval: no second line.
    sink.write([_loss(121, 0.3)])
    assert stream.getvalue() == "step 120  loss 0.4123  train_accuracy 0.91\n"

    sink.log_interval = 0.0
    sink.write([_loss(122, 0.25), _loss(122, 0.5, phase="eval")])
    sink.close()
    lines = stream.getvalue().splitlines()
    assert lines[1] == "step 122  loss 0.25  train_accuracy 0.91  eval/loss 0.5"
    assert lines[2] == "step 122  loss 0.25  train_accuracy 0.91  eval/loss 0.5  (finished)"
    assert len(lines) == 3
    assert "\x1b[" not in stream.getvalue()  # no terminal escapes in logs


def test_plain_mode_survives_odd_values() -> None:
    stream = StringIO()
    sink = ConsoleSink(stream=stream)
    sink.open(RunInfo(name=RUN))
    sink.write([
        _loss(0, float("nan")),
        Record(RUN, 0, "train", "fc1", "weights", "histogram", np.array([1.0, 2.0])),
        _act(0, "fc1", "mean", float("inf")),
    ])
    sink.close("failed")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "step 0  loss nan"
    assert lines[-1] == "step 0  loss nan  (failed)"


def test_close_without_records_says_so() -> None:
    stream = StringIO()
    sink = ConsoleSink(stream=stream)
    sink.open(RunInfo(name=RUN))
    sink.close()
    assert stream.getvalue() == "no steps recorded  (finished)\n"


def test_live_table_on_a_terminal() -> None:
    console = Console(file=StringIO(), force_terminal=True, width=120, color_system=None)
    sink = ConsoleSink(total=50, stream=console, metrics=("mean", "zero_frac"))
    sink.open(RunInfo(name=RUN))
    assert sink.live
    sink.write([
        _loss(9, 0.4321),
        _act(9, "features.0", "mean", 0.125),
        _act(9, "classifier", "zero_frac", 0.5),
        Record(RUN, 9, "train", "features.0", "activations", "histogram", np.array([1.0])),
        _act(9, "features.0", "zero_frac", float("nan")),
    ])
    sink.flush()
    sink.close()
    out = console.file.getvalue()  # type: ignore[attr-defined]
    final = out[out.rindex("sonde · mlp"):]
    assert "loss 0.4321" in final
    assert "10/50" in final  # steps are 0-based, so step 9 means ten done
    rows = [line for line in final.splitlines() if "features.0" in line or "classifier" in line]
    assert len(rows) == 2
    assert "features.0" in rows[0] and "classifier" in rows[1]  # first-seen order
    assert "0.125" in rows[0] and "nan" in rows[0]
    assert "-" in rows[1] and "0.5" in rows[1]  # classifier has no mean yet
    header = next(line for line in final.splitlines() if "layer" in line)
    assert "mean" in header and "zero_frac" in header and "norm" not in header


def test_live_display_through_sink_runner() -> None:
    console = Console(file=StringIO(), force_terminal=True, width=100, color_system=None)
    sink = ConsoleSink(stream=console, refresh_per_second=20)
    sink.open(RunInfo(name=RUN))
    runner = SinkRunner(sink)
    for step in range(5):
        runner.submit([_loss(step, 1.0 / (step + 1)), _act(step, f"layer{step % 2}", "std", float(step))])
    runner.close()
    assert runner.failed is None
    out = console.file.getvalue()  # type: ignore[attr-defined]
    final = out[out.rindex("sonde · mlp"):]
    assert "step 4" in final and "loss 0.2" in final
    assert "layer0" in final and "layer1" in final


def test_eval_records_filed_at_the_next_step_do_not_advance_progress_and_logits_stats_stay_out() -> None:
    stream = StringIO()
    sink = ConsoleSink(stream=stream)
    sink.log_interval = 0.0
    sink.open(RunInfo(name=RUN))
    sink.write([
        _loss(68, 0.3),
        Record(RUN, 68, "train", "", "outputs", "mean", 1.5),
        _loss(69, 0.2, phase="eval"),
        Record(RUN, 69, "eval", "", "outputs", "train_accuracy", 0.9),
    ])
    assert stream.getvalue().splitlines()[-1] == "step 68  loss 0.3  eval/loss 0.2  eval/accuracy 0.9"
