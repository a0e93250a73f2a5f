"""Dashboard at scale: page load of a run with 200 layers × 20 metrics × 100,000 steps.

    python benchmarks/dashboard.py [--store /tmp/big.db] [--steps 100000] [--layers 200]

Builds (once; reused when the file exists) a store whose run has ``--layers`` layers and 20
per-layer metrics, plus loss and accuracy, and then opens its run page in Debian's Chromium
and measures, in this one process, side by side with a run of 1,000 steps (same layers):

* the time until the page's skeleton is shown (the HTML answer and first paint);
* the time until every chart on the page has drawn its data (heatmap, two training curves,
  four layer lines, two histograms over time), each loaded lazily after the page is up;
* the same for the runs page, and the store queries behind the charts on their own;
* the ratio of each time for the long run to the short one (1.0: the length of a run costs nothing).

To keep the file at a few GB, the metric the overview shows first (``activations/zero_frac``)
has every layer at every step (``layers × steps`` rows: 20 million by default), as do loss,
accuracy and one layer's weight and gradient histograms; the other 19 metrics are recorded
every 1,000th step. Every chart query is an index range scan over its own series, so the rows
of the other metrics add index depth but no work to a page load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sonde.records import Record
from sonde.server.ui.data import heatmap_budget
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import Store, open_store

RUN = "big-run"
TOPIC_METRICS = [("activations", m) for m in ("zero_frac", "mean", "std", "norm", "max", "min", "abs_mean")] + [
    ("weights", m) for m in ("mean", "std", "norm")] + [
    ("weight_grads", m) for m in ("mean", "std", "norm", "nonfinite_frac")] + [
    ("weight_updates", m) for m in ("norm", "update_ratio")] + [
    ("output_grads", m) for m in ("mean", "std", "norm", "zero_frac")]
assert len(TOPIC_METRICS) == 20


def build(path: Path, steps: int, n_layers: int) -> Store:
    """Write the benchmark run (skipped when ``path`` already holds it)."""
    store = open_store(path)
    if RUN in set(store.runs()["name"]):
        return store
    layers = [f"blocks.{i // 2}.{'fc' if i % 2 == 0 else 'act'}" for i in range(n_layers)]
    info = RunInfo(RUN, model="DeepMLP", framework="torch",
                   layers=[LayerInfo(n, "Linear" if n.endswith("fc") else "ReLU") for n in layers])
    store.start_run(info)
    rng = np.random.default_rng(0)
    chunk = max(1, 200_000 // n_layers)
    started = time.perf_counter()
    edges = np.linspace(-1, 1, 65)
    for first in range(0, steps, chunk):
        batch: list[Record] = []
        span = range(first, min(steps, first + chunk))
        dead = rng.random((len(span), n_layers)) * 0.1 + np.linspace(0.3, 0.6, n_layers)
        for i, step in enumerate(span):
            row = dead[i]
            batch.extend(Record(RUN, step, "train", layer, "activations", "zero_frac", float(v))
                         for layer, v in zip(layers, row, strict=True))
            decay = float(np.exp(-step / steps * 4))
            batch.append(Record(RUN, step, "train", "", "loss", "loss", 2.3 * decay))
            batch.append(Record(RUN, step, "train", "", "outputs", "train_accuracy", 1 - decay))
            for topic in ("weights", "weight_grads"):
                batch.append(Record(RUN, step, "train", layers[0], topic, "histogram",
                                    rng.integers(0, 500, 64).astype(np.float64)))
            if step % 1000 == 0:
                for topic, metric in TOPIC_METRICS[1:]:
                    batch.extend(Record(RUN, step, "train", layer, topic, metric, float(rng.random()))
                                 for layer in layers)
        if first == 0:
            batch.extend(Record(RUN, 0, "train", layers[0], topic, "histogram_edges", edges)
                         for topic in ("weights", "weight_grads"))
        store.write(RUN, batch)
        done = min(steps, first + chunk)
        if done % (chunk * 50) == 0 or done == steps:
            rate = done * (n_layers + 4) / (time.perf_counter() - started)
            print(f"  built {done:,}/{steps:,} steps ({rate:,.0f} Records/s)", flush=True)
    store.finish_run(RUN, "finished")
    return store


def time_queries(store: Store, n_layers: int) -> None:
    layers = list(store.layers(RUN)["name"])
    calls = {
        "heatmap (150 columns)": lambda: store.heatmap(RUN, "activations", "zero_frac",
                                                       max_steps=heatmap_budget(n_layers)),
        "series (2,000 points)": lambda: store.series(RUN, layers[1], "activations", "zero_frac"),
        "histograms (200 steps)": lambda: store.histograms(RUN, layers[0], "weights"),
        "available": lambda: store.available(RUN),
    }
    for name, call in calls.items():
        times = []
        for _ in range(3):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        print(f"  store {name:<24} {1000 * statistics.median(times):8.0f} ms")


def measure_pages(path: Path, port: int) -> dict[str, float]:
    """Seconds until each page is shown and (run page) until all its charts have drawn data."""
    from playwright.sync_api import sync_playwright

    server = subprocess.Popen([sys.executable, "-m", "sonde.cli", "serve", "--port", str(port), "--store", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    times: dict[str, float] = {}
    try:
        import httpx

        for _ in range(300):
            try:
                if httpx.get(url + "/api/v1/runs", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            for label, target, charts in (("runs page", "/", 0), ("run page", f"/run/{RUN}", 6)):
                for attempt in range(2):  # the first load also warms the server's and the browser's caches
                    start = time.perf_counter()
                    page.goto(url + target)
                    page.locator("header").wait_for()
                    shown = time.perf_counter() - start
                    if charts:
                        page.wait_for_function(_ALL_DRAWN, arg=charts, timeout=120_000, polling=100)
                    drawn = time.perf_counter() - start
                    if attempt:
                        extra = f", all {charts} charts drawn {drawn:6.2f} s" if charts else ""
                        print(f"  {label:<10} shown {shown:5.2f} s{extra}")
                        times[f"{label} shown"], times[f"{label} drawn"] = shown, drawn
            page.screenshot(path="/tmp/sonde-dashboard-bench.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    return times


_ALL_DRAWN = """(n) => {
  const els = [...document.querySelectorAll('[data-chart]')];
  if (els.length < n) return false;
  return els.every(el => { const c = getElement(el)?.chart; const o = c && c.getOption();
                           return o && o.series.some(s => (s.data || []).length > 0); });
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/sonde-dashboard-bench.db")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--short-steps", type=int, default=1_000, help="steps of the short run it is compared with")
    args = parser.parse_args()
    results = []
    for path, steps in ((Path(args.store), args.steps), (Path(args.store).with_suffix(".short.db"), args.short_steps)):
        print(f"store {path}: {args.layers} layers × 20 metrics, {steps:,} steps")
        store = build(path, steps, args.layers)
        time_queries(store, args.layers)
        store.close()
        results.append(measure_pages(path, args.port))
    long, short = results
    print(f"\n{args.steps:,} steps ÷ {args.short_steps:,} steps, same layers and metrics (1.0 = length costs nothing):")
    for key in long:
        print(f"  {key:<18} {long[key]:6.2f} s ÷ {short[key]:6.2f} s = {long[key] / short[key]:4.2f}×")


if __name__ == "__main__":
    main()
