"""Remote probes: Records (and sampled tensors) to a running ``sonde serve`` over HTTP.

``sonde.probe(model, server="http://127.0.0.1:8080")`` puts a :class:`RemoteSink` where the
local store sink would be. Records are batched (msgpack, one uuid ``batch_id`` per batch) and
sent by the sink's own thread through an :class:`Outbox`: an ordered queue of requests that
lives in memory while the server answers, and in a spill directory on disk (one fsync'ed file
per request) while it does not, or when memory is full. A request leaves the spill only after
the server acknowledged it; the server ignores a batch id it has already stored, so replaying
is exactly-once. Training never waits for the network.

Spill layout: ``<spill_dir>/<session>/`` per sink, holding a ``lock`` (flock'ed while the
process lives), ``meta.msgpack`` (server URL), ``runs.msgpack`` (what the server said about
the runs: their names and first steps) and ``<seq>-<kind>.msgpack`` requests. A later
:class:`RemoteSink` with the same ``spill_dir`` and server adopts the sessions whose process is
gone and sends them first; :func:`replay` does it without a probe.

Example:
    >>> import sonde                                                          # doctest: +SKIP
    >>> with sonde.probe(model, server="http://127.0.0.1:8080") as p:         # doctest: +SKIP
    ...     train(model, p)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sonde.errors import ConfigError, RunExistsError, StoreError
from sonde.metrics.base import Metric
from sonde.metrics.server import ServerMetric
from sonde.records import Record
from sonde.run_info import RunInfo
from sonde.sinks.base import HEARTBEAT_EVERY, Sink
from sonde.sinks.outbox import DEFAULT_SPILL_DIR, Entry, Outbox, RunState, replay
from sonde.wire.client import normal_url
from sonde.wire.records import encode_records
from sonde.wire.retry import retryable

__all__ = ["RemoteSink", "bind_server_metrics", "encode_records", "replay"]

log = logging.getLogger("sonde")


@dataclass
class _Batching:
    records: list[Record] = field(default_factory=list)
    since: float = 0.0


class RemoteSink(Sink):
    """Ships Records to ``sonde serve`` in batches from its own thread; spills to disk when it cannot.

    ``open`` creates the run on the server (a taken name raises :class:`~sonde.errors.RunExistsError`,
    a refused token a :class:`~sonde.errors.StoreError`, as a local store would); when the server
    is unreachable the creation is queued like everything else and steps start at 0 (with
    ``resume=True`` they are shifted to the run's next step when the server answers).

    Args:
        server: base URL, e.g. ``http://127.0.0.1:8080`` (any role that takes Records).
        token: bearer token; default the ``SONDE_TOKEN`` environment variable.
        spill_dir: where requests wait while the server is unreachable (default ``./sonde-spill``).
        batch_records: a batch is sent once this many Records wait (whole steps are never split
            below it) ...
        max_delay: ... or this many seconds after its first Record arrived.
        timeout: seconds for one request.
        drain_timeout: at close, how long to try to send what is left before leaving it on disk.
        max_memory_bytes: queued request bytes kept in memory before spilling to disk, and the most
            held there while the disk refuses writes (beyond it requests are dropped, counted and logged).
        client: an ``httpx.Client`` to use (for tests against an in-process app).
        heartbeat: seconds between the run's heartbeats (``POST /api/v1/runs/{run}/heartbeat``, sent
            while the server answers, never queued), so that a run whose steps take minutes is not
            shown as ``stalled`` (default :data:`~sonde.sinks.base.HEARTBEAT_EVERY`).

    Example:
        >>> sink = RemoteSink("http://127.0.0.1:8080", spill_dir="/tmp/spill")   # doctest: +SKIP
        >>> with sonde.probe(model, store=None, sinks=[sink]) as p: ...           # doctest: +SKIP
    """

    name = "remote"

    def __init__(
        self,
        server: str = "http://127.0.0.1:8080",
        *,
        token: str | None = None,
        spill_dir: str | Path = DEFAULT_SPILL_DIR,
        batch_records: int = 20_000,
        max_delay: float = 0.5,
        timeout: float = 10.0,
        drain_timeout: float = 10.0,
        max_memory_bytes: int = 64 << 20,
        client: httpx.Client | None = None,
        heartbeat: float | None = None,
    ) -> None:
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise ConfigError(f"server= expects an http(s) URL such as 'http://127.0.0.1:8080', got {server!r}")
        self.server = normal_url(server)
        self.token = token if token is not None else os.environ.get("SONDE_TOKEN")
        self.spill_dir = spill_dir
        self.batch_records = batch_records
        self.max_delay = max_delay
        self.timeout = timeout
        self.drain_timeout = drain_timeout
        self.max_memory_bytes = max_memory_bytes
        self._client = client
        self.heartbeat = HEARTBEAT_EVERY if heartbeat is None else heartbeat
        self._next_beat = 0.0
        self.outbox: Outbox | None = None
        self.run: str | None = None
        self.relative = False
        self._batch = _Batching()
        self._lock = threading.Lock()
        #: called on the sender thread before each request (server-side metrics hand over tensors here)
        self.feeders: list[Callable[[], None]] = []

    def open(self, run: RunInfo) -> None:
        """Start the session (adopting abandoned spills) and create ``run`` on the server, or queue that."""
        self.outbox = outbox = Outbox(self.server, self.spill_dir, token=self.token, timeout=self.timeout,
                                      max_memory_bytes=self.max_memory_bytes, client=self._client)
        outbox.feeders.extend([*self.feeders, self._cut_if_stale, self._beat_if_due])
        self.run = run.name
        spec = {"name": run.name, "model": run.model, "framework": run.framework,
                "config": json.loads(json.dumps(run.config, default=str)),
                "layers": [{"name": layer.name, "type": layer.type, "params": layer.param_shapes}
                           for layer in run.layers],
                "resume": run.resume}
        entry = Entry(0, "run", run.name, json.dumps(spec).encode())
        try:
            response = outbox.request(entry)
        except httpx.TransportError as exc:
            response = None
            reason = f"{type(exc).__name__}: {exc}"
            entry.attempted = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
        if response is not None and response.status_code < 300:
            answer = response.json()
            run.first_step = int(answer.get("first_step", 0))
            outbox.runs[run.name] = RunState(str(answer.get("name", run.name)))
            return
        if response is not None and not retryable(response.status_code):
            outbox.close(0)
            error = _error_text(response)
            if response.status_code == 409:
                raise RunExistsError(f"server {self.server}: {error}")
            raise StoreError(f"server {self.server} refused to create run '{run.name}' "
                             f"({response.status_code}: {error})")
        if response is not None:
            reason = f"{response.status_code}: {_error_text(response)}"
        self.relative = run.resume  # the next step of a resumed run is known only when the server answers
        log.error("sonde: server %s unreachable at the start of run %r (%s); training goes on, Records spill to %s "
                  "and are sent when the server is back", self.server, run.name, reason, outbox.dir)
        run.first_step = 0
        outbox._down = True  # straight to disk: nothing waits in memory for a server that is away
        outbox.put("run", run.name, entry.body, attempted=entry.attempted, relative=self.relative)

    def write(self, records: Sequence[Record]) -> None:
        with self._lock:
            if not self._batch.records:
                self._batch.since = time.monotonic()
            self._batch.records.extend(records)
            if len(self._batch.records) >= self.batch_records:
                self._cut_locked()
        self._cut_if_stale()

    def _cut_if_stale(self) -> None:
        with self._lock:
            if self._batch.records and time.monotonic() - self._batch.since >= self.max_delay:
                self._cut_locked()

    def _beat_if_due(self) -> None:
        """Tell the server the run is alive, every ``heartbeat`` seconds (on the sender thread, between requests)."""
        outbox, run, now = self.outbox, self.run, time.monotonic()
        if outbox is None or run is None or outbox.down or now < self._next_beat:
            return
        state = outbox.runs.get(run)
        if state is None:  # the server has not created the run yet
            return
        self._next_beat = now + self.heartbeat
        try:
            outbox.wire.send("heartbeat", state.name, b"{}")
        except httpx.HTTPError:
            pass  # a missed beat costs nothing; the queued requests find out whether the server is away

    def _cut_locked(self) -> None:
        records, self._batch = self._batch.records, _Batching()
        if not records or self.outbox is None or self.run is None:
            return
        for start in range(0, len(records), 100_000):  # one step of a huge model: keep requests bounded
            chunk = records[start:start + 100_000]
            batch_id = str(uuid.uuid4())
            self.outbox.put("records", self.run, encode_records(batch_id, chunk), batch_id=batch_id,
                            count=len(chunk), relative=self.relative)

    def put(self, kind: str, body: bytes, *, batch_id: str = "", count: int = 0) -> None:
        """Queue another request of this run (``graph``, ``tensors``) behind the Records written so far."""
        if self.outbox is None or self.run is None:
            raise RuntimeError("RemoteSink.put() before open()")
        with self._lock:
            self._cut_locked()
            self.outbox.put(kind, self.run, body, batch_id=batch_id, count=count, relative=self.relative)

    def put_tensors(self, body: bytes, batch_id: str, count: int) -> None:
        """Queue a tensors payload (:mod:`sonde.wire.tensors`) for the server's evaluator."""
        self.put("tensors", body, batch_id=batch_id, count=count)

    def graph(self, graph: dict[str, Any]) -> None:
        """Send the model's graph (``PUT /api/v1/runs/{run}/graph``)."""
        self.put("graph", json.dumps(graph, default=str).encode())

    def flush(self) -> None:
        """Send what is waiting; wait (bounded) for the server unless it is known to be down."""
        with self._lock:
            self._cut_locked()
        if self.outbox is not None and not self.outbox.down:
            self.outbox.drain(self.drain_timeout)

    def close(self, status: str = "finished") -> None:
        """Queue the run's end, try to deliver everything for ``drain_timeout`` s, leave the rest on disk."""
        if self.outbox is None or self.run is None:
            return
        for feed in self.feeders:  # tensors of the last step, before the run's end
            feed()
        self.put("finish", json.dumps({"status": status}).encode())
        outbox, self.outbox = self.outbox, None
        left = outbox.close(self.drain_timeout)
        if left:
            log.error(
                "sonde: server %s did not take everything of run %r: %d request(s) are safe on disk in %s. "
                "They are sent by the next sonde.probe(..., server=%r) started in this directory (same spill_dir), "
                "or now with: sonde replay %s",
                self.server, self.run, left, outbox.dir, self.server, outbox.root,
            )


def bind_server_metrics(metrics: Sequence[Metric], sinks: Sequence[Sink]) -> None:
    """Connect the probe's :class:`~sonde.metrics.ServerMetric` instances to its remote sink, whose sender
    thread pumps their tensors out behind the Records; ConfigError when there is no remote sink."""
    wanted = [m for m in metrics if isinstance(m, ServerMetric)]
    if not wanted:
        return
    remote = next((s for s in sinks if isinstance(s, RemoteSink)), None)
    if remote is None:
        raise ConfigError(f"{wanted[0]!r} runs on a server: pass server='http://host:port' to sonde.probe")
    for metric in wanted:
        metric.shipper.connect(remote.put_tensors)
        remote.feeders.append(metric.shipper.pump)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:300]

