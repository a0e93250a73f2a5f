"""``sonde demo``: train a small MLP and a small CNN on scikit-learn's bundled digits, probed.

Everything sonde records goes to the SQLite store, TensorBoard event files and one CSV per
run; a live console table follows training. Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

import sonde
from sonde.sinks.console import ConsoleSink
from sonde.sinks.csv import CsvSink
from sonde.sinks.tensorboard import TensorBoardSink
from sonde.store import open_store

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    runs: list[str]
    store: str
    logdir: str


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits 8×8 images scaled to [0, 1]: a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def train(name: str, model: nn.Module, store: str, logdir: str, epochs: int, batch: int = 64) -> str:
    torch.manual_seed(0)
    x, y, x_test, y_test = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = (len(y) + batch - 1) // batch
    run = open_store(store).unique_run_name(name)
    sinks = [TensorBoardSink(logdir), CsvSink(logdir), ConsoleSink(total=epochs * steps_per_epoch)]
    with sonde.probe(model, run=run, store=store, optimizer=opt, sinks=sinks) as probe:
        for _ in range(epochs):
            model.train()
            for i in range(0, len(y), batch):
                xb, yb = x[i : i + batch], y[i : i + batch]
                out = model(xb)
                loss = loss_fn(out, yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                probe.log(loss=loss, labels=yb, outputs=out)
            model.eval()
            with torch.no_grad():  # recorded in phase "eval", never mixed with training
                out = model(x_test)
                probe.log(loss=loss_fn(out, y_test), labels=y_test, outputs=out)
    return run


def run_demo(store: str = "sonde.db", logdir: str = "runs", epochs: int = 3) -> DemoResult:
    runs = [train("mlp-digits", mlp(), store, logdir, epochs), train("cnn-digits", cnn(), store, logdir, epochs)]
    return DemoResult(runs=runs, store=os.path.abspath(store), logdir=os.path.abspath(logdir))


def print_summary(result: DemoResult) -> None:
    frame = sonde.load(result.store)
    frame = frame[frame["run"].isin(result.runs)]
    print(f"\nRecorded {len(frame):,} scalar values for runs {', '.join(result.runs)}.")
    loss = frame[(frame.metric == "loss") & (frame.phase == "train")].groupby("run")["value"]
    for run, values in loss:
        print(f"  {run}: loss {values.iloc[0]:.3f} -> {values.iloc[-1]:.3f}")
    dead = frame[(frame.topic == "activations") & (frame.metric == "zero_frac") & (frame.phase == "train")]
    last: dict[tuple[str, str], float] = {}
    for run, layer, value in dead.sort_values("step")[["run", "layer", "value"]].itertuples(index=False):
        last[(str(run), str(layer))] = float(value)
    if last:
        (run, layer), value = max(last.items(), key=lambda item: item[1])
        print(f"  most inactive layer: {run} / {layer}: {value:.0%} of its outputs are exactly zero")
    print(f"\nStore:       {result.store}   (pandas: sonde.load({result.store!r}, run=...))")
    print(f"CSV:         {os.path.join(result.logdir, '<run>', 'records.csv')}")
    print(f"TensorBoard: {result.logdir}")
    print(f"Open it with:  {os.path.join('.venv', 'bin', 'tensorboard')} --logdir {result.logdir}")


if __name__ == "__main__":  # pragma: no cover
    print_summary(run_demo())
