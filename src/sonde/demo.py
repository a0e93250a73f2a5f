"""``sonde demo``: train small networks on scikit-learn's bundled digits, probed, and serve the dashboard.

Three runs, so that the first dashboard a user sees shows what trouble looks like:

* ``mlp-healthy``: an MLP with a sensible learning rate (SGD 0.05, momentum 0.9);
* ``mlp-lr-too-high``: the same MLP at ten times that rate: the loss jumps, and within an epoch
  nearly every ReLU unit is dead (their ``activations`` ``zero_frac`` climbs to 1) and learning stops;
* ``cnn-digits``: a small CNN, healthy.

Every step is recorded (``every=1``: the models are tiny; a probe without ``every=`` keeps under
an overhead budget instead). Everything sonde records goes to the SQLite store, TensorBoard event files and one CSV per
run; a live console table follows training. The dashboard is served while the runs train
(watch them live) and afterwards until Ctrl-C. Nothing is downloaded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import sonde
from sonde.extras import require
from sonde.metrics import DEFAULT_METRICS, Alerts
from sonde.sinks.console import ConsoleSink
from sonde.sinks.csv import CsvSink
from sonde.sinks.tensorboard import TensorBoardSink
from sonde.store import open_store

__all__ = ["DEMO_RUNS", "Dashboard", "DemoResult", "run_demo", "serve_dashboard"]

#: The demo's runs: base name, model builder name, SGD learning rate.
DEMO_RUNS = (("mlp-healthy", "mlp", 0.05), ("mlp-lr-too-high", "mlp", 0.5), ("cnn-digits", "cnn", 0.05))


@dataclass
class DemoResult:
    runs: list[str]
    store: str
    logdir: str


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits 8×8 images scaled to [0, 1]: a fixed 80/20 split."""
    data = require("sklearn.datasets", "demo", "the demo's digits data").load_digits()
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


def train(
    name: str, model: nn.Module, store: str, logdir: str, epochs: int, batch: int = 64, lr: float = 0.05
) -> str:
    torch.manual_seed(0)
    x, y, x_test, y_test = digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = (len(y) + batch - 1) // batch
    run = open_store(store).unique_run_name(name)
    sinks = [TensorBoardSink(logdir), CsvSink(logdir), ConsoleSink(total=epochs * steps_per_epoch)]
    # Alerts after a 10-step warm-up (default 100): the demo's runs are short. Its models are tiny, so
    # every step is recorded (every=1) instead of what the default overhead budget would allow.
    metrics = [m for m in DEFAULT_METRICS if m != "alerts"] + [Alerts(warmup=10)]
    with sonde.probe(model, run=run, store=store, optimizer=opt, sinks=sinks, metrics=metrics, every=1) as probe:
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
    """Train the demo's runs (:data:`DEMO_RUNS`) into ``store``; names already taken get a suffix."""
    builders = {"mlp": mlp, "cnn": cnn}
    runs = [train(name, builders[kind](), store, logdir, epochs, lr=lr) for name, kind, lr in DEMO_RUNS]
    return DemoResult(runs=runs, store=os.path.abspath(store), logdir=os.path.abspath(logdir))


class Dashboard:
    """A ``sonde serve`` running on a background thread (see :func:`serve_dashboard`)."""

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self.server = server
        self.thread = thread
        self.url = url

    def wait(self) -> None:
        """Serve until Ctrl-C (or until the server stops)."""
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            pass
        self.stop()

    def stop(self) -> None:
        """Stop serving and wait for the server thread to end."""
        self.server.should_exit = True
        self.thread.join(10)


def serve_dashboard(store: str, host: str = "127.0.0.1", port: int = 8080) -> Dashboard:
    """Start the server (REST API and dashboard over ``store``) on a thread; returns once it listens.

    Raises:
        ConfigError: the port is taken (the message says which and what to pass instead).

    Example:
        >>> dashboard = serve_dashboard("sonde.db", port=8080)   # doctest: +SKIP
        >>> dashboard.url                                        # doctest: +SKIP
        'http://127.0.0.1:8080'
    """
    import uvicorn

    from sonde.errors import ConfigError
    from sonde.server.app import create_app

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe_socket:
        try:
            probe_socket.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the dashboard on {host}:{port} ({exc.strerror or exc}); another program (or an "
                f"earlier sonde) uses it: stop it, or pass --port to choose another port"
            ) from exc
    config = uvicorn.Config(create_app(store), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sonde-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise ConfigError(f"the dashboard did not start on {host}:{port}; see the messages above")
    shown = f"[{host}]" if ":" in host else host
    return Dashboard(server, thread, f"http://{shown}:{port}")


def print_summary(result: DemoResult) -> None:
    frame = sonde.load(result.store)
    frame = frame[frame["run"].isin(result.runs)]
    print(f"\nRecorded {len(frame):,} scalar values for runs {', '.join(result.runs)}, at every step (every=1: the "
          "models are tiny; by default sonde spaces its recordings to stay under 5% of training time).")
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


def print_dashboard(url: str, runs: list[str]) -> None:
    """Where to look in the dashboard: the runs page, and the run that shows trouble."""
    from urllib.parse import quote

    print(f"\nDashboard:   {url}   (Ctrl-C to stop)")
    trouble = [r for r in runs if "too-high" in r]
    for run in trouble:
        print(f"  what trouble looks like: {url}/run/{quote(run, safe='')}  (dying ReLUs in the overview heatmap)")
    if len(runs) >= 2:
        print(f"  compare the runs:        {url}/compare?runs={','.join(quote(r, safe='') for r in runs[:2])}")


if __name__ == "__main__":  # pragma: no cover
    print_summary(run_demo())
