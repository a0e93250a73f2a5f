"""The evaluator role: server-side metrics on shipped tensors, in a worker pool.

Tensors arrive through ``POST /api/v1/runs/{run}/tensors`` (see :mod:`sonde.server.api.tensors`);
ingest only decodes and queues them (202 at once; 503 when the queue is full, so a slow task
never delays ingest). Each worker owns a shard of the (run, phase, layer, topic, metric)
series, so one series' steps run in order on one metric instance, exactly as the probe's bus
would run them: ``update`` with a :class:`~sonde.metrics.base.Capture`, then ``compute`` at the
steps its ``compute_every`` accepts, then ``reset`` as its ``reset=`` says. Marks the probe sends
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
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sonde.bus import to_host
from sonde.metrics.base import Capture, Metric
from sonde.records import Record
from sonde.server.api.tensors import Mark, TensorItem, metric_from_spec
from sonde.sinks.remote import encode_records
from sonde.store import Store, open_store

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
    headers = {"Content-Type": "application/msgpack"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    client = httpx.Client(base_url=frontend_url.rstrip("/"), headers=headers, timeout=30.0)

    def write(run: str, batch_id: str, records: Sequence[Record]) -> None:
        body = encode_records(batch_id, records)
        deadline, wait = time.monotonic() + patience, 0.1
        while True:
            try:
                response = client.post(f"/api/v1/runs/{quote(run, safe='')}/records", content=body)
                if response.status_code < 300:
                    return
                if response.status_code < 500 and response.status_code not in (408, 429):
                    raise RuntimeError(f"the frontend refused them ({response.status_code}: {response.text[:200]})")
                problem = f"{response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the frontend {frontend_url} did not take them for {patience:.0f} s ({problem})")
            time.sleep(wait)
            wait = min(wait * 2, 2.0)

    return write


class Evaluator:
    """A pool of worker threads running metrics on shipped tensors.

    Args:
        write: ``write(run, batch_id, records)``: where the Records go.
        workers: threads; each owns a shard of the series.
        max_queue: items waiting per worker before ``submit`` answers ``"full"``.

    Example:
        >>> ev = Evaluator(store_writer(store))                  # doctest: +SKIP
        >>> ev.submit("mlp", "b1", items)                        # doctest: +SKIP
        'queued'
    """

    def __init__(self, write: Writer, *, workers: int = 2, max_queue: int = 256) -> None:
        self.write = write
        self._queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=max_queue) for _ in range(max(1, workers))]
        self._instances: dict[tuple[str, ...], Metric] = {}
        # Instances updated since their last compute: key -> step of the last update.
        self._pending: dict[tuple[str, ...], int] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[int, str]] = {}  # per metric name: failures and the last error
        self.processed = 0
        self._threads = [threading.Thread(target=self._loop, args=(q,), name=f"sonde-evaluator-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

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
        tensor = torch.from_numpy(np.ascontiguousarray(item.tensor))
        labels = None if item.labels is None else torch.from_numpy(np.ascontiguousarray(item.labels))
        records: list[Record] = []
        for spec in item.metrics:
            spec_key = json.dumps(spec, sort_keys=True)
            key = (run, item.phase, item.layer, item.topic, spec_key)
            metric = self._instances.get(key)
            if metric is None:
                metric = self._instances[key] = metric_from_spec(spec)
            capture = Capture(tensor, layer=item.layer, topic=item.topic, phase=item.phase, step=item.step,
                              labels=labels, layer_type=item.layer_type)
            try:
                metric.prepare(capture)
                metric.update(capture)
                metric.updates += 1
                metric.absorb_staged(to_host(value for _, value in metric.staged))
            except Exception as exc:  # noqa: BLE001 - a failing metric is reported once, the others go on
                metric.staged.clear()
                self._failure(spec["name"], item.layer, item.topic, exc)
                continue
            self._pending[key] = item.step
            if item.phase != "train" or metric.due(item.step):  # an eval pass is one value, as in the probe
                records += self._compute(key, metric, reset=metric.reset_policy == "compute")
        if records:
            self.write(run, derived_id(batch_id, index), records)
        self.processed += 1

    def _compute(self, key: tuple[str, ...], metric: Metric, *, reset: bool) -> list[Record]:
        """Records of ``metric``'s pending state, at the step of its last update; reset it if asked."""
        run, phase, layer, topic, _ = key
        step = self._pending.pop(key)
        try:
            result = metric.compute()
        except Exception as exc:  # noqa: BLE001
            self._failure(metric.name, layer, topic, exc)
            result = {}
        if reset:
            metric.reset()
        return [Record(run, step, phase, layer, topic, name, value) for name, value in result.items()]

    def _end(self, run: str, batch_id: str, mark: Mark, shard: int) -> None:
        """An epoch or the run ended: compute and reset (or free) this shard's instances of the mark's metrics."""
        specs = {json.dumps(spec, sort_keys=True) for spec in mark.metrics}
        records: list[Record] = []
        for key, metric in list(self._instances.items()):
            if key[0] != run or key[4] not in specs or self._shard(*key[:4]) != shard:
                continue
            ending = mark.kind == "run_end" or metric.reset_policy == "epoch"
            if ending and key in self._pending:
                records += self._compute(key, metric, reset=False)
            if mark.kind == "run_end":
                del self._instances[key]
            elif metric.reset_policy == "epoch":
                metric.reset()
        if records:
            self.write(run, batch_id, records)

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
    from sonde.errors import ConfigError
    from sonde.server.api.security import Guard
    from sonde.server.api.tensors import router

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
    app.include_router(router, prefix="/api/v1")

    @app.get("/api/v1/health")
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
