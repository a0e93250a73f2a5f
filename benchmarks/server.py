"""Server and store numbers: Record ingest throughput and the latency of a downsampled query.

    python benchmarks/server.py [--records 400000] [--batch 50000] [--postgres postgresql://...]

Rows, each measured in this one process:

* ingest through ``Store.write_batch`` (idempotent batches, one transaction each) on SQLite and,
  when a URL is given (``--postgres`` or ``SONDE_TEST_POSTGRES_URL``), on PostgreSQL;
* ingest through ``POST /api/v1/runs/{run}/records`` (msgpack), in-process over httpx's ASGI
  transport, so it counts decoding and validation but no network;
* the median latency of ``GET .../series`` for a 100,000-step series downsampled to 2,000 points
  (store call and HTTP call), and of the overview heatmap of a 200-layer run;
* as a reference for the machine's speed, sqlite3's own ``executemany`` of the same rows into a
  table without indexes, so the store's number can be read as a ratio when the machine is busy.

Records are shaped like a probe's: 200 layers × 5 metrics per step. Each number is printed
beside its goal, with the ratio (measured ÷ goal for throughput, goal ÷ measured for latency;
above 1 means the goal is met).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np

from sonde.records import Record
from sonde.server.app import create_app
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import Store, open_store

INGEST_GOAL = 200_000  # Records/s on SQLite (issue 3)
QUERY_GOAL_MS = 100.0  # downsampled 100,000-step series
LAYERS = [f"layer{i}" for i in range(200)]
METRICS = ["mean", "std", "norm", "max", "zero_frac"]


def rows(start_step: int, count: int) -> list[list[Any]]:
    """``count`` Records as wire rows, steps from ``start_step``, 1,000 per step."""
    out: list[list[Any]] = []
    per_step = len(LAYERS) * len(METRICS)
    rng = np.random.default_rng(start_step)
    values = rng.normal(size=count).tolist()
    for i in range(count):
        step, k = divmod(i, per_step)
        layer, metric = divmod(k, len(METRICS))
        out.append([start_step + step, "train", LAYERS[layer], "activations", METRICS[metric], values[i]])
    return out


def as_records(run: str, batch: list[list[Any]]) -> list[Record]:
    return [Record(run, *row) for row in batch]


def new_run(store: Store, name: str) -> str:
    store.start_run(RunInfo(name, layers=[LayerInfo(n, "Linear") for n in LAYERS]))
    return name


def ingest_store(store: Store, total: int, batch: int) -> float:
    run = new_run(store, f"bench-{uuid.uuid4().hex[:8]}")
    batches = [as_records(run, rows(i // 1000, batch)) for i in range(0, total, batch)]
    start = time.perf_counter()
    for b in batches:
        store.write_batch(run, uuid.uuid4().hex, b)
    return total / (time.perf_counter() - start)


def ingest_raw_sqlite(tmp: Path, total: int, batch: int) -> float:
    """The floor of the cost: sqlite3's executemany of the same rows (as the store's columns) into an
    unindexed table with the same pragmas, from ready-made tuples."""
    conn = sqlite3.connect(tmp / "raw.db", isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-65536"):
        conn.execute(f"PRAGMA {pragma}")
    conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, run_id INT, step INT, value REAL, array BLOB, "
                 "series_id INT)")
    batches = [[(1, row[0], row[5], None, k % 1000) for k, row in enumerate(rows(i // 1000, batch))]
               for i in range(0, total, batch)]
    start = time.perf_counter()
    for b in batches:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO records (run_id, step, value, array, series_id) VALUES (?, ?, ?, ?, ?)", b)
        conn.execute("COMMIT")
    rate = total / (time.perf_counter() - start)
    conn.close()
    return rate


def heatmap_latency(store: Store, repeats: int, steps: int = 2000) -> float:
    """A 200-layer run, ``steps`` steps of one metric: the overview heatmap at 400 columns."""
    run = new_run(store, f"wide-{uuid.uuid4().hex[:8]}")
    for lo in range(0, steps, 250):
        store.write(run, [Record(run, s, "train", layer, "weights", "norm", float(s))
                          for s in range(lo, min(lo + 250, steps)) for layer in LAYERS])
    return median_ms(lambda: store.heatmap(run, "weights", "norm", max_steps=400), repeats)


def ingest_http(store: Store, total: int, batch: int) -> float:
    app = create_app(store, ui=False)
    run = f"bench-http-{uuid.uuid4().hex[:8]}"
    bodies = [msgpack.packb({"batch_id": uuid.uuid4().hex, "records": rows(i // 1000, batch)})
              for i in range(0, total, batch)]

    async def go() -> float:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            (await client.post("/api/v1/runs", json={"name": run, "layers": [{"name": n} for n in LAYERS]}))\
                .raise_for_status()
            start = time.perf_counter()
            for body in bodies:
                r = await client.post(f"/api/v1/runs/{run}/records", content=body,
                                      headers={"content-type": "application/msgpack"})
                r.raise_for_status()
            return total / (time.perf_counter() - start)

    return asyncio.run(go())


def long_series(store: Store, steps: int = 100_000) -> str:
    """A run with one 100,000-step series among neighbours (another metric, another layer)."""
    run = new_run(store, f"long-{uuid.uuid4().hex[:8]}")
    values = np.random.default_rng(0).normal(size=steps)
    for lo in range(0, steps, 50_000):
        batch = [Record(run, s, "train", layer, "weights", metric, float(values[s]))
                 for s in range(lo, min(lo + 50_000, steps)) for layer in ("fc1", "fc2") for metric in ("norm", "mean")]
        store.write(run, batch)
    return run


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches once, as a dashboard that refreshes would have them
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def query_latency(store: Store, repeats: int) -> tuple[float, float]:
    run = long_series(store)
    store_ms = median_ms(lambda: store.series(run, "fc1", "weights", "norm", max_points=2000), repeats)
    app = create_app(store, ui=False)

    async def go() -> float:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            params = {"layer": "fc1", "topic": "weights", "metric": "norm", "max_points": 2000}
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                r = await client.get(f"/api/v1/runs/{run}/series", params=params)
                times.append(time.perf_counter() - start)
                assert len(r.json()["step"]) <= 2000
            return 1000 * statistics.median(times[1:])

    return store_ms, asyncio.run(go())


def line(name: str, value: float, unit: str, goal: float | None, higher_is_better: bool) -> None:
    if goal is None:
        print(f"{name:<44} {value:>12,.1f} {unit:<10}")
        return
    ratio = value / goal if higher_is_better else goal / value
    mark = "meets" if ratio >= 1 else "MISSES"
    print(f"{name:<44} {value:>12,.1f} {unit:<10} goal {'≥' if higher_is_better else '<'} {goal:,.0f}   "
          f"×{ratio:.2f} {mark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=400_000, help="Records per ingest measurement")
    parser.add_argument("--batch", type=int, default=50_000, help="Records per batch (per POST)")
    parser.add_argument("--repeats", type=int, default=20, help="query repetitions (median)")
    parser.add_argument("--postgres", default=os.environ.get("SONDE_TEST_POSTGRES_URL"),
                        help="PostgreSQL URL (default: $SONDE_TEST_POSTGRES_URL); uses a schema of its own")
    args = parser.parse_args(argv)
    print(f"{args.records:,} Records per ingest row, {args.batch:,} per batch; 200 layers × 5 metrics per step\n")
    with tempfile.TemporaryDirectory() as tmp:
        backends: list[tuple[str, Store]] = [("SQLite", open_store(Path(tmp) / "bench.db"))]
        schema = f"sonde_bench_{uuid.uuid4().hex[:8]}"
        if args.postgres:
            import psycopg

            admin = args.postgres.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            sep = "&" if "?" in args.postgres else "?"
            backends.append(("PostgreSQL", open_store(f"{args.postgres}{sep}options=-csearch_path%3D{schema}")))
        else:
            print("(PostgreSQL rows skipped: pass --postgres URL or set SONDE_TEST_POSTGRES_URL)\n")
        raw = ingest_raw_sqlite(Path(tmp), args.records, args.batch)
        line("sqlite3 executemany, no index (reference)", raw, "Records/s", None, True)
        for label, store in backends:
            before = {r["name"] for r in store.run_infos()}
            goal = INGEST_GOAL if label == "SQLite" else None
            try:
                rate = ingest_store(store, args.records, args.batch)
                line(f"{label}: ingest via Store.write_batch", rate, "Records/s", goal, True)
                if label == "SQLite":
                    print(f"{'':<44} (×{rate / raw:.2f} of the unindexed sqlite3 reference above)")
                line(f"{label}: ingest via POST /records (msgpack)", ingest_http(store, args.records, args.batch),
                     "Records/s", goal, True)
                store_ms, http_ms = query_latency(store, args.repeats)
                line(f"{label}: 100k-step series → 2,000 pts (Store)", store_ms, "ms", QUERY_GOAL_MS, False)
                line(f"{label}: 100k-step series → 2,000 pts (HTTP)", http_ms, "ms", QUERY_GOAL_MS, False)
                line(f"{label}: heatmap 200 layers × 2,000 steps → 400", heatmap_latency(store, args.repeats), "ms",
                     None, False)
            finally:
                for info in store.run_infos():
                    if info["name"] not in before:
                        store.delete_run(info["name"])
                store.close()
        if args.postgres:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    sys.exit(main())
