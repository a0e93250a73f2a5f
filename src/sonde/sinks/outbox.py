"""The Outbox: an ordered queue of HTTP requests to one server, in memory or spilled to disk.

A :class:`~sonde.sinks.remote.RemoteSink` sends everything (run creation, Record batches,
tensors, the run's end) through one Outbox. Requests wait in memory while the server answers;
when it does not, or memory is full, they are written, fsync'ed, one file per request, to a
session directory under the spill directory, and from then on everything goes there, so the
order is kept. A request leaves the spill only after the server acknowledged it; the server
ignores a batch id it has already stored, so replaying is exactly-once.

Spill layout: ``<spill_dir>/<session>/`` per sink, holding a ``lock`` (flock'ed while the
process lives), ``meta.msgpack`` (server URL), ``runs.msgpack`` (what the server said about
the runs: their names and first steps) and ``<seq>-<kind>.msgpack`` requests. A later Outbox
with the same ``spill_dir`` and server adopts the sessions whose process is gone and sends
them first; :func:`replay` does it without a probe (``sonde replay``).

Example:
    >>> replay("sonde-spill", "http://127.0.0.1:8080")   # doctest: +SKIP
    0
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import msgpack

from sonde.errors import ConfigError

try:  # POSIX advisory locks tell a live session from an abandoned one
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_SPILL_DIR", "Entry", "Outbox", "adopt_session", "replay"]

log = logging.getLogger("sonde")

API = "/api/v1"
DEFAULT_SPILL_DIR = "sonde-spill"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_AUTH_STATUS = {401, 403}


def _shift_records(body: bytes, offset: int) -> bytes:
    payload = msgpack.unpackb(body, raw=False)
    for row in payload["records"]:
        row[0] += offset
    return msgpack.packb(payload, use_bin_type=True)


@dataclass(eq=False)
class Entry:
    """One request waiting to be sent: its kind fixes the method and path."""

    seq: int
    kind: str  # run | records | finish | graph | tensors
    run: str
    body: bytes
    batch_id: str = ""
    count: int = 0  # records (or tensors) in it, for the logs
    relative: bool = False  # steps count from the run's first step, which the server tells later
    attempted: bool = False  # a run creation that may have reached the server (timeout after sending)
    file: Path | None = None
    retry_at: float = 0.0  # a deferred tensors request waits until then; the Records behind it go on
    tries: int = 0

    _ROUTES: ClassVar[dict[str, tuple[str, str, str]]] = {
        "run": ("POST", "", "application/json"),
        "records": ("POST", "/records", "application/msgpack"),
        "finish": ("POST", "/finish", "application/json"),
        "graph": ("PUT", "/graph", "application/json"),
        "tensors": ("POST", "/tensors", "application/octet-stream"),
    }

    def pack(self) -> bytes:
        fields = {"kind": self.kind, "run": self.run, "body": self.body, "batch_id": self.batch_id,
                  "count": self.count, "relative": self.relative, "attempted": self.attempted}
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def unpack(cls, seq: int, data: bytes, file: Path) -> Entry:
        f = msgpack.unpackb(data, raw=False)
        return cls(seq, f["kind"], f["run"], f["body"], f["batch_id"], f["count"], f["relative"], f["attempted"], file)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def normal_url(url: str) -> str:
    return url.rstrip("/")


@dataclass
class RunState:
    name: str
    offset: int = 0


class Outbox:
    """Ordered requests to one server, sent one at a time by a daemon thread; spilled to disk in trouble.

    ``put`` never touches the network. While the server answers and less than
    ``max_memory_bytes`` wait, requests wait in memory; otherwise they are written, fsync'ed, to
    the session directory, and from then on everything goes there (order is kept: memory is
    used only while the spill is empty). A request leaves the spill after the server's 2xx; a
    4xx that retrying cannot fix moves it to ``<spill_dir>/rejected/`` and is logged.

    Args:
        server: base URL of ``sonde serve`` (any role that takes these requests).
        spill_dir: parent directory of the session directories.
        client: an ``httpx.Client`` to send with (tests pass one bound to an in-process app).
        adopt: send first the sessions of dead processes for the same server found in ``spill_dir``.
    """

    def __init__(
        self,
        server: str,
        spill_dir: str | Path = DEFAULT_SPILL_DIR,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        max_memory_bytes: int = 64 << 20,
        client: httpx.Client | None = None,
        adopt: bool = True,
        start: bool = True,
    ) -> None:
        self.server = normal_url(server)
        self.root = Path(spill_dir).expanduser().resolve()
        self.max_memory_bytes = max_memory_bytes
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = client or httpx.Client(
            base_url=self.server, headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0))
        )
        if client is not None and token:
            self.client.headers.update(headers)
        self._own_client = client is None  # a client passed in stays open for its owner
        self.dir = self._new_session()
        self.runs: dict[str, RunState] = {}
        self._memory: deque[Entry] = deque()
        self._memory_bytes = 0
        self._disk: deque[Entry] = deque()
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = False
        self._down = False
        self.sent = 0
        self.rejected = 0
        self.feeders: list[Callable[[], None]] = []  # called by the sender thread before each pick
        self._reported: set[str] = set()
        if adopt:
            self._adopt_orphans()
        self._thread = threading.Thread(target=self._loop, name="sonde-remote", daemon=True)
        if start:
            self._thread.start()

    # -- spill directory -------------------------------------------------------------------
    def _new_session(self) -> Path:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            path.mkdir(parents=True)  # parents: another session may have just removed an empty root
            self._lock_file = open(path / "lock", "wb")  # held for the session's life
            if fcntl is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_durably(path / "meta.msgpack", msgpack.packb({"server": self.server}))
        except OSError as exc:
            raise ConfigError(
                f"cannot create the spill directory for remote Records under '{self.root}' ({exc}); "
                "pass spill_dir= a writable directory"
            ) from exc
        return path

    def _adopt_orphans(self) -> None:
        for other in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.dir and p.name != "rejected"):
            adopted = adopt_session(other, into=self, server=self.server)
            if adopted:
                log.warning("sonde: replaying %d spilled request(s) of an earlier session from %s", adopted, other)

    def _save_runs(self) -> None:
        state = {k: {"name": v.name, "offset": v.offset} for k, v in self.runs.items()}
        _write_durably(self.dir / "runs.msgpack", msgpack.packb(state, use_bin_type=True))

    def _spill_locked(self, entry: Entry) -> None:
        path = self.dir / f"{entry.seq:012d}-{entry.kind}.msgpack"
        _write_durably(path, entry.pack())
        entry.file = path
        self._disk.append(entry)

    def _spill_memory_locked(self) -> None:
        while self._memory:
            entry = self._memory.popleft()
            self._memory_bytes -= len(entry.body)
            self._spill_locked(entry)

    # -- queueing --------------------------------------------------------------------------
    def put(self, kind: str, run: str, body: bytes, *, batch_id: str = "", count: int = 0,
            relative: bool = False, attempted: bool = False) -> None:
        """Queue one request (thread-safe; writes to disk when the server is down or memory is full)."""
        with self._cond:
            self._seq += 1
            entry = Entry(self._seq, kind, run, body, batch_id, count, relative, attempted)
            if self._disk or self._down or self._memory_bytes + len(body) > self.max_memory_bytes:
                self._spill_memory_locked()
                try:
                    self._spill_locked(entry)
                except OSError as exc:
                    self._report("spill", "sonde: cannot write the spill in %s (%s); keeping requests in memory",
                                 self.dir, exc)
                    self._memory.append(entry)
                    self._memory_bytes += len(body)
            else:
                self._memory.append(entry)
                self._memory_bytes += len(body)
            self._cond.notify_all()

    def pending(self) -> tuple[int, int]:
        """Requests waiting (in memory, on disk)."""
        with self._cond:
            return len(self._memory), len(self._disk)

    @property
    def down(self) -> bool:
        return self._down

    def drain(self, timeout: float) -> bool:
        """Wait until every queued request is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._memory or self._disk:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float) -> int:
        """Drain for at most ``timeout`` seconds, stop the thread, spill what is left; returns that count."""
        self.drain(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(max(5.0, timeout))
        with self._cond:
            self._spill_memory_locked()
            left = len(self._disk)
        if left == 0:
            self._remove_session()
        else:
            self._save_runs()
        self._lock_file.close()  # releases the flock: a later session may adopt this one
        if self._own_client:
            self.client.close()
        return left

    def _remove_session(self) -> None:
        for path in self.dir.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()
            self.root.rmdir()  # only when no other session is there: no empty directory left behind

    # -- sending ---------------------------------------------------------------------------
    def _loop(self) -> None:
        backoff = 0.05
        while True:
            for feed in self.feeders:
                try:
                    feed()
                except Exception as exc:  # noqa: BLE001 - the sender must outlive any feeder bug
                    self._report(f"feed{id(feed)}", "sonde: remote sink feeder failed: %s", exc)
            with self._cond:
                entry = self._pick_locked()
                if entry is None:
                    if self._stop:
                        return
                    self._cond.wait(0.1)
                    continue
            outcome = self._send(entry)
            with self._cond:
                if outcome == "defer":  # the evaluator is busy or away: its tensors wait, Records do not
                    entry.tries += 1
                    entry.retry_at = time.monotonic() + min(0.25 * 2**entry.tries, 10.0)
                    if self._stop:
                        return
                    continue
                if outcome == "retry":
                    self._down = True
                    self._spill_memory_locked()
                    if self._stop:
                        return
                    self._cond.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if self._down:
                    self._down = False
                    log.warning("sonde: server %s is reachable again; sending spilled requests", self.server)
                if entry.file is not None:
                    self._disk.remove(entry)
                else:
                    self._memory.remove(entry)
                    self._memory_bytes -= len(entry.body)
                if entry.file is not None:
                    if outcome == "rejected":
                        self._set_aside(entry)
                    else:
                        with contextlib.suppress(OSError):
                            entry.file.unlink()
                if outcome == "ok":
                    self.sent += 1
                self._cond.notify_all()

    def _pick_locked(self) -> Entry | None:
        """The oldest request that is not a deferred tensors request."""
        now = time.monotonic()
        for waiting in (self._disk, self._memory):
            for n, entry in enumerate(waiting):
                if entry.retry_at <= now:
                    return entry
                if n > 1000:
                    break
        return None

    def _set_aside(self, entry: Entry) -> None:
        assert entry.file is not None
        aside = self.root / "rejected"
        with contextlib.suppress(OSError):
            aside.mkdir(exist_ok=True)
            os.replace(entry.file, aside / f"{self.dir.name}-{entry.file.name}")

    def _report(self, key: str, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.error(message, *args)

    def _path(self, entry: Entry) -> str:
        if entry.kind == "run":
            return f"{API}/runs"
        state = self.runs.get(entry.run)
        name = state.name if state is not None else entry.run
        return f"{API}/runs/{quote(name, safe='')}{Entry._ROUTES[entry.kind][1]}"

    def _body(self, entry: Entry) -> bytes:
        state = self.runs.get(entry.run)
        if not entry.relative or state is None or state.offset == 0:
            return entry.body
        if entry.kind == "records":
            return _shift_records(entry.body, state.offset)
        if entry.kind == "tensors":
            from sonde.server.api.tensors import shift_steps  # the payload format lives with its endpoint

            return shift_steps(entry.body, state.offset)
        return entry.body

    def request(self, entry: Entry) -> httpx.Response:
        method, _, content_type = Entry._ROUTES[entry.kind]
        return self.client.request(method, self._path(entry), content=self._body(entry),
                                   headers={"Content-Type": content_type})

    def _send(self, entry: Entry) -> str:
        """``ok``, ``retry`` (server down or busy), ``defer`` (tensors the server cannot take now: later, and
        the requests behind go first) or ``rejected`` (a 4xx that retrying cannot fix)."""
        try:
            response = self.request(entry)
        except httpx.TransportError as exc:
            if entry.kind == "run" and not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                entry.attempted = True  # it may have been created: retry as a resume
            self._report("down", "sonde: server %s unreachable (%s: %s); Records spill to %s and are sent when it "
                         "is back (training goes on)", self.server, type(exc).__name__, exc, self.dir)
            return "retry"
        self._reported.discard("down")
        status = response.status_code
        if entry.kind == "run" and status < 300:
            return self._run_created(entry, response)
        if entry.kind == "run" and status == 409:
            return self._run_conflict(entry)
        if status < 300:
            return "ok"
        if entry.kind == "tensors" and status in RETRY_STATUS:
            self._report("defer", "sonde: server %s cannot take tensors for server-side metrics now (%d: %s); "
                         "they wait, Records go on", self.server, status, response.text[:200])
            return "defer"
        if status in RETRY_STATUS or status in _AUTH_STATUS:
            why = "refuses our token (set SONDE_TOKEN)" if status in _AUTH_STATUS else "is busy"
            self._report(f"status{status}", "sonde: server %s %s (%d: %s); requests wait in %s", self.server, why,
                         status, response.text[:200], self.dir)
            return "retry"
        self.rejected += 1
        log.error("sonde: server %s rejected a %s request of run %r (%d: %s); set aside in %s", self.server,
                  entry.kind, entry.run, status, response.text[:300], self.root / "rejected")
        return "rejected"

    def _run_created(self, entry: Entry, response: httpx.Response) -> str:
        try:
            answer = response.json()
            name, first = str(answer["name"]), int(answer.get("first_step", 0))
        except (ValueError, KeyError, TypeError):
            name, first = entry.run, 0
        self.runs[entry.run] = RunState(name, first if entry.relative else 0)
        with contextlib.suppress(OSError):
            self._save_runs()
        if name != entry.run:
            log.error("sonde: run %r is recorded on the server as %r (the name was taken)", entry.run, name)
        return "ok"

    def _run_conflict(self, entry: Entry) -> str:
        spec = json.loads(entry.body)
        if entry.attempted and not spec.get("resume"):
            spec["resume"] = True  # our own earlier attempt created it: append to it
        else:
            base = entry.run
            n = int(spec["name"].rsplit("-", 1)[1]) + 1 if spec["name"] != base else 2
            spec["name"] = f"{base}-{n}"
        entry.body = json.dumps(spec).encode()
        return self._send(entry)


def adopt_session(session: Path, *, into: Outbox, server: str | None) -> int:
    """Move the requests of an abandoned session (its process gone) into ``into``; returns how many.

    Sessions of another server are left alone unless ``server`` is None. A session whose lock is
    held belongs to a live process and is skipped.
    """
    try:
        lock = open(session / "lock", "ab")
    except OSError:
        return 0
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0
        try:
            meta = msgpack.unpackb((session / "meta.msgpack").read_bytes(), raw=False)
        except (OSError, ValueError):
            meta = {}
        if server is not None and normal_url(str(meta.get("server", ""))) != normal_url(server):
            return 0
        with contextlib.suppress(OSError, ValueError):
            state = msgpack.unpackb((session / "runs.msgpack").read_bytes(), raw=False)
            for run, s in state.items():
                into.runs.setdefault(run, RunState(s["name"], s["offset"]))
        files = sorted(session.glob("[0-9]*-*.msgpack"))
        with into._cond:
            for path in files:
                try:
                    entry = Entry.unpack(0, path.read_bytes(), path)
                except (OSError, ValueError, KeyError) as exc:
                    log.error("sonde: unreadable spill file %s (%s); left in place", path, exc)
                    continue
                into._seq += 1
                entry.seq = into._seq
                target = into.dir / f"{entry.seq:012d}-{entry.kind}.msgpack"
                os.replace(path, target)
                entry.file = target
                into._disk.append(entry)
            _fsync_dir(into.dir)
            if into.runs:
                into._save_runs()
        for leftover in session.iterdir():
            if leftover.name.startswith(("lock", "meta", "runs", ".tmp-")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        with contextlib.suppress(OSError):
            session.rmdir()
        return len(files)
    finally:
        lock.close()


def replay(spill_dir: str | Path = DEFAULT_SPILL_DIR, server: str | None = None, *, token: str | None = None,
           timeout: float = 60.0, client: httpx.Client | None = None) -> int:
    """Send the requests spilled by earlier remote probes; returns how many are still left.

    Every abandoned session under ``spill_dir`` goes to the server it was meant for, or to
    ``server`` when given. Sessions of running probes are left to them.

    Example:
        >>> replay("sonde-spill")                                  # doctest: +SKIP
        0
    """
    root = Path(spill_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"no spill directory at '{root}'")
    targets: set[str] = set()
    for session in root.iterdir():
        with contextlib.suppress(OSError, ValueError):
            targets.add(normal_url(msgpack.unpackb((session / "meta.msgpack").read_bytes(), raw=False)["server"]))
    left = 0
    for target in sorted({server} if server else targets):
        outbox = Outbox(target, root, token=token or os.environ.get("SONDE_TOKEN"), client=client, adopt=False,
                        start=False)
        for session in sorted(p for p in root.iterdir() if p.is_dir() and p != outbox.dir and p.name != "rejected"):
            adopt_session(session, into=outbox, server=None if server else target)
        outbox._thread.start()
        left += outbox.close(timeout)
    return left


