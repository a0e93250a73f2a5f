"""Alerts fire on deliberately broken models, name the right layer, and stay quiet on a healthy one."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.metrics import DEFAULT_METRICS, Alerts
from sonde.records import Record
from sonde.sinks.console import ConsoleSink
from sonde.sinks.csv import CsvSink


class Poison(nn.Module):
    """Identity, except that it turns its output into NaN while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan") if self.armed else x * 1.0


def alerts(collect: Collect) -> list[Record]:
    return [r for r in collect.records if r.metric == "alert"]


def train(model: nn.Module, steps: int, collect: Collect, *, lr: float = 0.05, metrics: list | None = None,
          before_step: dict[int, object] | None = None, sinks: list | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=gen)
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect, *(sinks or [])],
                     metrics=metrics or [*DEFAULT_METRICS, Alerts(warmup=2)]) as p:
        for step in range(steps):
            if before_step and step in before_step:
                before_step[step]()  # type: ignore[operator]
            x = torch.randn(64, 8, generator=gen)
            y = (x @ w).argmax(dim=1)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        p.flush()


def test_healthy_model_raises_no_alert(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    train(model, 12, collect)
    assert any(r.metric == "zero_frac" for r in collect.records)  # the alerts had something to read
    assert alerts(collect) == []


def test_dead_relu_layer_is_named_once_after_warmup(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every unit of the second ReLU is dead from the start
    train(model, 8, collect)
    found = alerts(collect)
    dead = [r for r in found if r.topic == "activations"]
    assert [(r.step, r.layer) for r in dead] == [(2, "3")]  # onset only, after warm-up
    assert "layer '3': 100% of its activations are exactly zero at step 2" in dead[0].message
    assert dead[0].value == 1.0
    # No gradient flows through a dead layer, so the layers below it stop learning, and the one
    # above, fed only zeros, gets no weight gradient either: all three say so.
    stalled = [(r.step, r.layer) for r in found if r.topic == "weight_updates"]
    assert stalled == [(2, "0"), (2, "2"), (2, "4")]
    assert all("learning has stalled" in r.message for r in found if r.topic == "weight_updates")


def test_nan_in_a_middle_layer_names_the_first_layer_in_forward_order(collect: Collect) -> None:
    poison = Poison()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), poison, nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    train(model, 6, collect, before_step={3: lambda: setattr(poison, "armed", True)})
    nan_alerts = [r for r in alerts(collect) if "NaN/Inf" in r.message]
    assert len(nan_alerts) == 1  # one episode: the NaN stays (the weights take it in), no repeat
    alert = nan_alerts[0]
    assert (alert.step, alert.layer, alert.topic) == (3, "2", "activations")
    assert "first appeared at step 3 in layer '2'" in alert.message and "later layer(s) followed" in alert.message
    # Earlier layers are non-finite too at that step (their gradients): forward order decides.
    assert collect.value(step=3, layer="0", topic="weight_grads", metric="nonfinite_frac") > 0


def test_update_ratio_outside_the_healthy_range(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    train(model, 5, collect, lr=0.0)
    found = alerts(collect)
    assert [(r.step, r.layer, r.topic) for r in found] == [(2, "0", "weight_updates"), (2, "2", "weight_updates")]
    assert "weight update ratio 0 at step 2 is below the healthy range 1e-05…0.1" in found[0].message


def test_saturation_collapse_and_thresholds_from_records() -> None:
    watcher = Alerts(warmup=10, collapse=0.5)

    def sat(step: int, value: float) -> list[Record]:
        return watcher.watch([Record("r", step, "train", "fc", "activations", "saturation", value)])

    assert sat(0, 0.8) == [] and sat(10, 0.9) == [] and sat(20, 0.5) == []
    collapsed = sat(30, 0.4)
    assert len(collapsed) == 1 and "collapsed to 0.4 at step 30, under 50% of its peak 0.9" in collapsed[0].message
    assert sat(40, 0.3) == []  # still collapsed: no repeat
    assert sat(50, 0.8) == [] and len(sat(60, 0.2)) == 1  # recovered, then collapsed again
    strict = Alerts(warmup=0, dead_frac=0.5, update_ratio=(1e-3, 1e-2))
    got = strict.watch([Record("r", 1, "train", "a", "activations", "zero_frac", 0.6),
                        Record("r", 1, "train", "a", "weight_updates", "update_ratio", 0.05),
                        Record("r", 1, "train", "a", "bias_updates", "update_ratio", 5.0)])  # biases: no rule
    assert [r.topic for r in got] == ["activations", "weight_updates"]
    with pytest.raises(ConfigError, match="Alerts expects 0 < dead_frac <= 1"):
        Alerts(dead_frac=2.0)


def test_alerts_reach_the_csv_and_the_console(tmp_path: Path, collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    out = io.StringIO()
    train(model, 4, collect, sinks=[CsvSink(tmp_path), ConsoleSink(stream=out)])
    (run,) = {r.run for r in collect.records}
    df = pd.read_csv(tmp_path / run / "records.csv", keep_default_na=False, dtype={"layer": str})
    rows = df[(df["metric"] == "alert") & (df["topic"] == "activations")]
    assert rows[["step", "layer"]].values.tolist() == [[2, "1"]]
    assert rows["message"].iloc[0].startswith("layer '1': 100% of its activations are exactly zero")
    assert (df[df["metric"] != "alert"]["message"] == "").all()
    assert "ALERT step 2 1/activations: layer '1': 100% of its activations" in out.getvalue()


def test_alerts_round_trip_through_the_store(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    db = tmp_path / "sonde.db"
    with sonde.probe(model, run="dead", store=db, optimizer=opt, metrics=[*DEFAULT_METRICS, Alerts(warmup=1)]):
        for _ in range(3):
            model(torch.randn(16, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    plain = sonde.load(db, run="dead", metrics="alert")
    assert list(plain.columns) == ["run", "step", "phase", "layer", "topic", "metric", "value"]
    df = sonde.load(db, run="dead", metrics="alert", messages=True)
    dead = df[df["topic"] == "activations"]
    assert dead[["step", "layer", "value"]].values.tolist() == [[1, "1", 1.0]]
    assert dead["message"].iloc[0].startswith("layer '1': 100% of its activations are exactly zero at step 1")
    others = sonde.load(db, run="dead", metrics="zero_frac", messages=True)
    assert len(others) > 0 and (others["message"] == "").all()


def test_each_alert_reaches_the_user_once(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                          collect: Collect) -> None:
    def dead_model() -> nn.Module:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            model[0].bias.fill_(-100.0)
        return model

    # With the console sink: its ALERT line, and no log line besides.
    with caplog.at_level(logging.WARNING, logger="sonde"):
        train(dead_model(), 4, collect, sinks=[ConsoleSink()])
    printed = capsys.readouterr()
    dead = "layer '1': 100% of its activations are exactly zero"
    assert (printed.out + printed.err).count(dead) == 1
    assert [r for r in caplog.records if dead in r.getMessage()] == []
    # Without it: the log line, once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sonde"):
        train(dead_model(), 4, Collect())
    assert sum(dead in r.getMessage() for r in caplog.records) == 1
    assert dead not in capsys.readouterr().out


def test_nan_episodes_hold_when_records_arrive_out_of_step_order() -> None:
    # The server's evaluator computes layers on several workers, so a layer's step-1 Records may
    # arrive after another layer's step 2: one episode is still one alert.
    def nonfinite(step: int, layer: str, share: float) -> list[Record]:
        return [Record("r", step, "train", layer, "activations", "nonfinite_frac", share)]

    alerts = Alerts(warmup=0)
    assert [r.step for r in alerts.watch(nonfinite(1, "0", 0.25))] == [1]
    assert alerts.watch(nonfinite(2, "0", 0.0)) == []  # finite again: the episode is over
    assert alerts.watch(nonfinite(1, "1", 0.5)) == []  # late, and part of the episode that was
    assert [r.step for r in alerts.watch(nonfinite(3, "0", 0.25))] == [3]  # a new episode

    late = Alerts(warmup=0)
    assert [r.step for r in late.watch(nonfinite(5, "0", 0.25))] == [5]
    assert late.watch(nonfinite(4, "1", 0.0)) == []  # a late finite step from before the episode
    assert late.watch(nonfinite(6, "0", 0.25)) == []  # the episode goes on: no second alert
