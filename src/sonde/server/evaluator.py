"""The evaluator role: server-side metrics on shipped tensors, in a worker pool.

Tensors arrive through ``POST /api/v1/runs/{run}/tensors`` (see :mod:`sonde.wire.tensors`);
ingest only decodes and queues them (202 at once; 503 when the queue is full, so a slow task
never delays ingest). Each worker owns a shard of the (run, phase, layer, topic, metric)
series, so one series' steps run in order on one metric instance, on the probe's own
:class:`~sonde.metrics.engine.MetricEngine`: ``update`` with a :class:`~sonde.metrics.base.Capture`,
then ``compute`` at the steps its ``compute_every`` accepts, then ``reset`` as its ``reset=`` says;
the Records go through the run's alerts (:class:`~sonde.metrics.Alerts`, one set per run) as a
probe's do, so a server-side metric raises alerts too. Marks the probe sends
in order with the tensors end an epoch (``reset="epoch"`` metrics compute and start afresh) or
the run (every state not computed yet is computed at its last step, as the probe does at close,
and the run's instances are freed). The Records go to the store (role ``all``) or to the
frontend's records endpoint (role ``evaluator``), each item under a batch id derived from the
payload's, so a replayed payload stores nothing twice.

Example:
    >>> app = create_evaluator_app("http://127.0.0.1:8080")       # doctest: +SKIP
    >>> uvicorn.run(app, port=8081)                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, cast

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sonde.errors import ConfigError
from sonde.metrics.alerts import Alerts
from sonde.metrics.base import Capture, Metric
from sonde.metrics.engine import MetricEngine
from sonde.metrics.server import metric_from_spec
from sonde.records import Record
from sonde.server.api.security import Guard
from sonde.server.api.tensors import router
from sonde.store import Store, open_store
from sonde.wire.client import WireClient
from sonde.wire.records import encode_records
from sonde.wire.retry import Backoff, retryable
from sonde.wire.routes import PREFIX
from sonde.wire.tensors import Mark, TensorItem

__all__ = ["Evaluator", "create_evaluator_app", "evaluator_of", "http_writer", "store_writer"]

log = logging.getLogger("sonde.server")

Writer = Callable[[str, str, Sequence[Record]], Any]
_NAMESPACE = uuid.UUID("5b0e7c1e-4a53-4f1c-9d7e-3c6a1f0de7a1")
_STOP = object()


def derived_id(batch_id: str, *parts: object) -> str:
    """A deterministic batch id for something computed from batch ``batch_id``."""
    return str(uuid.uuid5(_NAMESPACE, "\n".join([batch_id, *map(str, parts)])))


def store_writer(store: Store) -> Writer:
    """Write Records straight into ``store``, once per batch id."""
    return lambda run, batch_id, records: store.write_batch(run, batch_id, records)


def http_writer(frontend_url: str, *, token: str | None = None, patience: float = 60.0) -> Writer:
    """POST Records to the frontend's records endpoint, retrying for ``patience`` s while it is away."""
    client = WireClient(frontend_url, token=token, timeout=30.0, connect_timeout=30.0)

    def write(run: str, batch_id: str, records: Sequence[Record]) -> None:
        body = encode_records(batch_id, records)
        deadline, wait = time.monotonic() + patience, Backoff(0.1, 2.0)
        while True:
            try:
                response = client.send("records", run, body)
                if response.status_code < 300:
                    return
                if not retryable(response.status_code):
                    raise RuntimeError(f"the frontend refused them ({response.status_code}: {response.text[:200]})")
                problem = f"{response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the frontend {frontend_url} did not take them for {patience:.0f} s ({problem})")
            time.sleep(wait.next())

    return write


class Evaluator:
    """A pool of worker threads running metrics on shipped tensors.

    Args:
        write: ``write(run, batch_id, records)``: where the Records go.
        workers: threads; each owns a shard of the series.
        max_queue: items waiting per worker before ``submit`` answers ``"full"``.
        alerts: watch each run's Records with :class:`~sonde.metrics.Alerts` (its default rules).

    Example:
        >>> ev = Evaluator(store_writer(store))                  # doctest: +SKIP
        >>> ev.submit("mlp", "b1", items)                        # doctest: +SKIP
        'queued'
    """

    def __init__(self, write: Writer, *, workers: int = 2, max_queue: int = 256, alerts: bool = True) -> None:
        self.write = write
        self.alerts = alerts
        self._queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=max_queue) for _ in range(max(1, workers))]
        # One engine per (run, shard): each worker runs its own series of the run on it.
        self._engines: dict[tuple[str, int], MetricEngine] = {}
        self._watchers: dict[str, list[Metric]] = {}  # per run: alerts over its server-side Records
        # (run, phase, layer, topic, spec) -> step of the instance's last update.
        self._pending: dict[tuple[str, ...], int] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[int, str]] = {}  # per metric name: failures and the last error
        self.processed = 0
        self._threads = [threading.Thread(target=self._loop, args=(q,), name=f"sonde-evaluator-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    @property
    def _instances(self) -> dict[tuple[str, ...], Metric]:
        """Every live metric instance by (run, phase, layer, topic, spec)."""
        with self._lock:
            engines = list(self._engines.items())
        return {(run, *cast("tuple[str, ...]", key)): metrics[0] for (run, _), engine in engines
                for key, metrics in list(engine.instances.items())}

    def _engine(self, run: str, shard: int) -> MetricEngine:
        with self._lock:
            engine = self._engines.get((run, shard))
            if engine is None:
                watchers = self._watchers.get(run)
                if watchers is None:
                    watchers = self._watchers[run] = [Alerts()] if self.alerts else []
                engine = self._engines[(run, shard)] = MetricEngine(run, watchers=watchers,
                                                                    on_failure=self._metric_failed)
            return engine

    def _shard(self, run: str, phase: str, layer: str, topic: str) -> int:
        return zlib.crc32(f"{run}\n{phase}\n{layer}\n{topic}".encode()) % len(self._queues)

    def submit(
        self, run: str, batch_id: str, items: Sequence[TensorItem | Mark]
    ) -> Literal["queued", "duplicate", "full"]:
        """Queue a payload's items (a mark on every shard, after what is queued there); never blocks."""
        with self._lock:
            if (run, batch_id) in self._seen:
                return "duplicate"
            every = range(len(self._queues))
            shards = [every if isinstance(item, Mark) else [self._shard(run, item.phase, item.layer, item.topic)]
                      for item in items]
            wanted = [shard for targets in shards for shard in targets]
            for shard in set(wanted):
                q = self._queues[shard]
                if q.maxsize - q.qsize() < wanted.count(shard):
                    return "full"
            for index, (item, targets) in enumerate(zip(items, shards)):
                for shard in targets:
                    self._queues[shard].put_nowait((run, batch_id, index, item, shard))
            self._seen[(run, batch_id)] = None
            while len(self._seen) > 100_000:
                self._seen.popitem(last=False)
        return "queued"

    def join(self, timeout: float = 30.0) -> bool:
        """Wait until every queued item is processed; False on timeout."""
        deadline = time.monotonic() + timeout
        for q in self._queues:
            while q.unfinished_tasks:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued work (bounded) and stop the workers."""
        if not self.join(timeout):
            log.error("sonde evaluator: work still queued after %.0f s at shutdown; it is dropped", timeout)
        for q in self._queues:
            q.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        for name, (count, last) in self._failed.items():
            if count > 1:
                log.error("sonde evaluator: metric %r failed %d times (last: %s); its values are missing there",
                          name, count, last)

    def _loop(self, q: queue.Queue[Any]) -> None:
        while True:
            work = q.get()
            try:
                if work is _STOP:
                    return
                self._process(*work)
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the worker
                log.error("sonde evaluator: %s: %s", type(exc).__name__, exc)
            finally:
                q.task_done()

    def _process(self, run: str, batch_id: str, index: int, item: TensorItem | Mark, shard: int) -> None:
        if isinstance(item, Mark):
            self._end(run, derived_id(batch_id, index, shard), item, shard)
            return
        engine = self._engine(run, shard)
        tensor = torch.from_numpy(np.ascontiguousarray(item.tensor))
        labels = None if item.labels is None else torch.from_numpy(np.ascontiguousarray(item.labels))
        capture = Capture(tensor, layer=item.layer, topic=item.topic, phase=item.phase, step=item.step,
                          labels=labels, layer_type=item.layer_type)
        metrics: list[Metric] = []
        for spec in item.metrics:
            key = (item.phase, item.layer, item.topic, json.dumps(spec, sort_keys=True))
            instances = engine.instances.get(key)
            if instances is None:
                instances = engine.instances[key] = [metric_from_spec(spec)]
            metrics.extend(instances)
            self._pending[(run, *key)] = item.step
        # The probe's lifecycle, on this one shipped series: update, absorb, compute when due (an eval
        # pass always: one value, as in the probe), reset as reset= says; then the run's alerts.
        engine.update((item.layer, item.topic), metrics, capture)
        records = engine.flush(item.phase, item.step, only=metrics)
        records += engine.watch(records)
        if records:
            self.write(run, derived_id(batch_id, index), records)
        self.processed += 1

    def _end(self, run: str, batch_id: str, mark: Mark, shard: int) -> None:
        """An epoch or the run ended: compute (at the step of their last update) and reset, or free, this
        shard's instances of the mark's metrics."""
        engine = self._engines.get((run, shard))
        if engine is None:
            return
        specs = {json.dumps(spec, sort_keys=True) for spec in mark.metrics}
        records: list[Record] = []
        ended: list[tuple[str, ...]] = []
        for hashable, instances in list(engine.instances.items()):
            key = cast("tuple[str, ...]", hashable)  # (phase, layer, topic, spec)
            if key[3] not in specs:
                continue
            phase = key[0]
            if mark.kind == "run_end":
                step = self._pending.pop((run, *key), None)
                if step is not None:
                    records += engine.flush(phase, step, final=True, only=instances)
                ended.append(key)
            elif any(m.reset_policy == "epoch" for m in instances):
                step = self._pending.get((run, *key), 0)
                records += engine.flush(phase, step, epoch_end=True, only=instances)
        engine.forget(ended)
        records += engine.watch(records)
        if records:
            self.write(run, batch_id, records)
        if not engine.instances:
            with self._lock:
                del self._engines[(run, shard)]
                if not any(r == run for r, _ in self._engines):
                    self._watchers.pop(run, None)

    def _metric_failed(self, metric: Metric, exc: Exception, layer: str, topic: str) -> None:
        metric.staged.clear()  # what a failed update staged is not folded in
        self._failure(metric.name, layer, topic, exc)

    def _failure(self, name: str, layer: str, topic: str, exc: Exception) -> None:
        """Log a metric's first failure; count the later ones (logged with their count at :meth:`close`)."""
        with self._lock:
            count, _ = self._failed.get(name, (0, ""))
            self._failed[name] = (count + 1, f"{type(exc).__name__}: {exc} on {layer}/{topic}")
        if count == 0:
            log.error("sonde evaluator: metric %r failed on %s/%s (%s: %s); its values are missing",
                      name, layer, topic, type(exc).__name__, exc)


def evaluator_of(app: FastAPI) -> Evaluator:
    """The app's evaluator; role ``all`` makes one on first use, writing to the app's store."""
    evaluator: Evaluator | None = getattr(app.state, "evaluator", None)
    if evaluator is None:
        with _app_lock:
            evaluator = getattr(app.state, "evaluator", None)
            if evaluator is None:
                evaluator = app.state.evaluator = Evaluator(store_writer(app.state.store))
    return evaluator


_app_lock = threading.Lock()


def create_evaluator_app(
    frontend_url: str | None = None,
    *,
    store: str | Path | Store | None = None,
    token: str | None = None,
    workers: int = 2,
    max_queue: int = 256,
    max_body: int = 256 << 20,
) -> FastAPI:
    """The app of the ``evaluator`` role (port 8081): ``POST /api/v1/runs/{run}/tensors`` and ``GET /api/v1/health``.

    Records go to ``frontend_url`` (the frontend role's records endpoint) when given, else
    straight into ``store`` (a path, URL or Store shared with the frontend).

    Example:
        >>> app = create_evaluator_app("http://127.0.0.1:8080", token="s3cret")   # doctest: +SKIP
    """
    opened: Store | None = None
    if frontend_url:
        write = http_writer(frontend_url, token=token)
    elif store is not None:
        opened = store if isinstance(store, Store) else open_store(store)
        write = store_writer(opened)
    else:
        raise ConfigError("the evaluator needs frontend_url='http://host:8080' or store= to write its Records to")
    evaluator = Evaluator(write, workers=workers, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        evaluator.close()

    app = FastAPI(title="sonde evaluator", version="1", lifespan=lifespan)
    app.state.role, app.state.store, app.state.token, app.state.evaluator = "evaluator", opened, token, evaluator
    app.include_router(router, prefix=PREFIX)

    @app.get(f"{PREFIX}/health")
    def health() -> dict[str, Any]:
        return {"role": "evaluator", "processed": evaluator.processed}

    install_json_errors(app)
    app.add_middleware(Guard, token=token, max_body=max_body)
    return app


def install_json_errors(app: FastAPI) -> None:
    """Every error as ``{"error": ...}`` JSON, like the frontend's."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"error": f"{exc.detail} ({request.method} {request.url.path})"},
                            status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"error": f"invalid request: {exc.errors()[:3]}"}, status_code=422)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
