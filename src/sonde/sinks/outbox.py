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
from typing import Any, BinaryIO, ClassVar

import httpx
import msgpack

from sonde.background import charged
from sonde.errors import ConfigError
from sonde.wire.client import WireClient, normal_url
from sonde.wire.records import shift_records
from sonde.wire.retry import Backoff, delay, refused, retryable
from sonde.wire.routes import ROUTES
from sonde.wire.tensors import shift_steps

try:  # POSIX advisory locks tell a live session from an abandoned one
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_SPILL_DIR", "Entry", "Outbox", "adopt_session", "replay"]

log = logging.getLogger("sonde")

DEFAULT_SPILL_DIR = "sonde-spill"


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
    error: str = ""  # why the server rejected it

    #: (method, path below the run, Content-Type) per kind: the protocol's own table (:mod:`sonde.wire.routes`).
    _ROUTES: ClassVar[dict[str, tuple[str, str, str]]] = ROUTES

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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a half-written file must not keep the space a full disk needs
        raise
    _fsync_dir(path.parent)


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
    4xx that retrying cannot fix is written to ``<spill_dir>/rejected/`` and logged.

    A disk that refuses a write (full, read-only) loses nothing: requests stay in memory, in
    order, up to ``max_memory_bytes``, and go out when the server answers. Only past that budget
    are requests dropped, which is logged at once and counted again at :meth:`close` (``lost``).

    Args:
        server: base URL of ``sonde serve`` (any role that takes these requests).
        spill_dir: parent directory of the session directories.
        client: an ``httpx.Client`` to send with (tests pass one bound to an in-process app).
        adopt: send first the sessions of dead processes for the same server found in ``spill_dir``.
        session: send the requests of this abandoned session directory where they lie, instead of
            starting a new session (:func:`replay`: nothing is written before the first answer);
            ConfigError when a live process holds it.
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
        session: Path | None = None,
    ) -> None:
        self.server = normal_url(server)
        self.root = Path(spill_dir).expanduser().resolve()
        self.max_memory_bytes = max_memory_bytes
        self.wire = WireClient(self.server, token=token, timeout=timeout, client=client)
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
        self.lost = 0  # requests dropped: the disk refused them and the memory budget was used up
        self.lost_records = 0
        self.feeders: list[Callable[[], None]] = []  # called by the sender thread before each pick
        self._reported: set[str] = set()
        self._meta_saved = False  # meta.msgpack is written with the first request that reaches the disk
        try:
            self.dir = self._new_session() if session is None else self._take_session(session)
        except ConfigError:
            self.wire.close()  # a client passed in stays open for its owner
            raise
        if adopt:
            self._adopt_orphans()
        self._thread = threading.Thread(target=self._loop, name="sonde-remote", daemon=True)
        if start:
            self._thread.start()

    # -- spill directory -------------------------------------------------------------------
    def _new_session(self) -> Path:
        path = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path.mkdir(parents=True)  # parents: another session may have just removed an empty root
            self._lock_file: BinaryIO = open(path / "lock", "wb")  # held for the session's life
            if fcntl is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            with contextlib.suppress(OSError):
                (path / "lock").unlink()
                path.rmdir()
            raise ConfigError(
                f"cannot create the spill directory for remote Records under '{self.root}' ({exc}); "
                "pass spill_dir= a writable directory"
            ) from exc
        return path

    def _take_session(self, session: Path) -> Path:
        lock = _claim(session)
        if lock is None:
            raise ConfigError(f"the spill session {session} belongs to a running probe; it sends it itself")
        self._lock_file = lock
        self._meta_saved = (session / "meta.msgpack").exists()
        self.runs.update(_read_runs(session))
        for entry in _read_requests(session):
            self._disk.append(entry)
            self._seq = max(self._seq, entry.seq)
        return session

    def _adopt_orphans(self) -> None:
        for other in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.dir and p.name != "rejected"):
            adopted = adopt_session(other, into=self, server=self.server)
            if adopted:
                log.warning("sonde: replaying %d spilled request(s) of an earlier session from %s", adopted, other)

    def _save_meta(self) -> None:
        if not self._meta_saved:
            _write_durably(self.dir / "meta.msgpack", msgpack.packb({"server": self.server}))
            self._meta_saved = True

    def _save_runs(self) -> None:
        state = {k: {"name": v.name, "offset": v.offset} for k, v in self.runs.items()}
        _write_durably(self.dir / "runs.msgpack", msgpack.packb(state, use_bin_type=True))

    def _spill_locked(self, entry: Entry) -> bool:
        """Write ``entry`` to the session directory and queue it there; False (and nothing changed) if refused."""
        path = self.dir / f"{entry.seq:012d}-{entry.kind}.msgpack"
        try:
            self._save_meta()
            _write_durably(path, entry.pack())
        except OSError as exc:
            self._report("spill", "sonde: cannot write the spill in %s (%s); keeping requests in memory "
                         "(up to %d MiB) until the server takes them", self.dir, exc, self.max_memory_bytes >> 20)
            return False
        entry.file = path
        self._disk.append(entry)
        return True

    def _spill_memory_locked(self) -> bool:
        """Move the requests waiting in memory to disk, oldest first; False when the disk refused one.

        What the disk refused stays in memory, and so must everything after it (the order is kept).
        """
        while self._memory:
            entry = self._memory[0]  # written before it leaves memory: a failed write loses nothing
            if not self._spill_locked(entry):
                return False
            self._memory.popleft()
            self._memory_bytes -= len(entry.body)
        return True

    def _keep_in_memory_locked(self, entry: Entry) -> None:
        """Hold ``entry`` in memory while the disk refuses writes; past the budget, drop it, loudly."""
        if self._memory_bytes + len(entry.body) > self.max_memory_bytes and entry.kind not in ("run", "finish"):
            self.lost += 1  # a run's creation and end are tiny and everything else depends on them: kept
            self.lost_records += entry.count if entry.kind == "records" else 0
            self._report("lost", "sonde: the spill in %s cannot be written and %d MiB of requests already wait in "
                         "memory: requests of run %r are being DROPPED until the disk or the server takes them "
                         "(free space there, or raise max_memory_bytes=); the count is logged at the end",
                         self.dir, self.max_memory_bytes >> 20, entry.run)
            return
        self._memory.append(entry)
        self._memory_bytes += len(entry.body)

    # -- queueing --------------------------------------------------------------------------
    def put(self, kind: str, run: str, body: bytes, *, batch_id: str = "", count: int = 0,
            relative: bool = False, attempted: bool = False) -> None:
        """Queue one request (thread-safe; writes to disk when the server is down or memory is full)."""
        with self._cond:
            self._seq += 1
            entry = Entry(self._seq, kind, run, body, batch_id, count, relative, attempted)
            if self._disk or self._down or self._memory_bytes + len(body) > self.max_memory_bytes:
                if not (self._spill_memory_locked() and self._spill_locked(entry)):
                    self._keep_in_memory_locked(entry)
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
        """Drain for at most ``timeout`` seconds, stop the thread, spill what is left; returns the count on disk.

        What neither the server nor the disk took is lost with the process: counted in ``lost`` and logged.
        """
        self.drain(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(max(5.0, timeout))
        with self._cond:
            self._spill_memory_locked()
            for entry in self._memory:
                self.lost += 1
                self.lost_records += entry.count if entry.kind == "records" else 0
            self._memory.clear()
            self._memory_bytes = 0
            left = len(self._disk)
        if self.lost:
            log.error("sonde: %d request(s) for server %s, with %d Records, were lost: the server did not take "
                      "them and the spill in %s could not be written (disk full or read-only)", self.lost,
                      self.server, self.lost_records, self.dir)
        if left == 0:
            self._remove_session()
        else:
            try:
                self._save_runs()
            except OSError as exc:
                log.error("sonde: cannot write %s (%s): the spilled requests are kept, but not what the server "
                          "said about their runs (a renamed run's name, a resumed run's first step)",
                          self.dir / "runs.msgpack", exc)
        self._lock_file.close()  # releases the flock: a later session may adopt this one
        self.wire.close()
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
        backoff = Backoff(0.05, 2.0)
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
            with charged():  # counted by the overhead budget (sonde.background); waiting is not
                outcome = self._send(entry)
            with self._cond:
                if outcome == "defer":  # the evaluator is busy or away: its tensors wait, Records do not
                    entry.tries += 1
                    entry.retry_at = time.monotonic() + delay(entry.tries, 0.25, 10.0)
                    if self._stop:
                        return
                    continue
                if outcome == "retry":
                    self._down = True
                    self._spill_memory_locked()
                    if self._stop:
                        return
                    self._cond.wait(backoff.next())
                    continue
                backoff.reset()
                if self._down:
                    self._down = False
                    log.warning("sonde: server %s is reachable again; sending spilled requests", self.server)
                if entry.file is not None:
                    self._disk.remove(entry)
                else:
                    self._memory.remove(entry)
                    self._memory_bytes -= len(entry.body)
                if outcome == "rejected":
                    self._set_aside(entry)
                elif entry.file is not None:
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
        """Keep a request the server rejected in ``<spill_dir>/rejected/``, from disk or memory; log where it went."""
        aside = self.root / "rejected"
        target = aside / f"{self.dir.name}-{entry.seq:012d}-{entry.kind}.msgpack"
        try:
            aside.mkdir(exist_ok=True)
            if entry.file is not None:
                os.replace(entry.file, target)
            else:
                _write_durably(target, entry.pack())
        except OSError as exc:
            what = f"its {entry.count} Records are" if entry.kind == "records" else "it is"
            log.error("sonde: server %s rejected a %s request of run %r (%s) and it could not be set aside in %s "
                      "(%s): %s lost", self.server, entry.kind, entry.run, entry.error, aside, exc, what)
            return
        log.error("sonde: server %s rejected a %s request of run %r (%s); set aside in %s", self.server,
                  entry.kind, entry.run, entry.error, target)

    def _report(self, key: str, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.error(message, *args)

    def _body(self, entry: Entry) -> bytes:
        """The body to send: a resumed run's steps shifted by its first step, once the server told it."""
        state = self.runs.get(entry.run)
        if not entry.relative or state is None or state.offset == 0:
            return entry.body
        if entry.kind == "records":
            return shift_records(entry.body, state.offset)
        if entry.kind == "tensors":
            return shift_steps(entry.body, state.offset)
        return entry.body

    def request(self, entry: Entry) -> httpx.Response:
        """Send ``entry`` once, under the name the server gave its run."""
        state = self.runs.get(entry.run)
        return self.wire.send(entry.kind, state.name if state is not None else entry.run, self._body(entry))

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
        if entry.kind == "tensors" and retryable(status):
            self._report("defer", "sonde: server %s cannot take tensors for server-side metrics now (%d: %s); "
                         "they wait, Records go on", self.server, status, response.text[:200])
            return "defer"
        if retryable(status) or refused(status):
            why = "refuses our token (set SONDE_TOKEN)" if refused(status) else "is busy"
            self._report(f"status{status}", "sonde: server %s %s (%d: %s); requests wait in %s", self.server, why,
                         status, response.text[:200], self.dir)
            return "retry"
        self.rejected += 1
        entry.error = f"{status}: {response.text[:300]}"  # logged with where the request was set aside
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


def _claim(session: Path) -> BinaryIO | None:
    """The flock'ed lock file of an abandoned session; None when a live process holds it (or there is none)."""
    try:
        lock = open(session / "lock", "ab")  # held by the caller until it is done with the session
    except OSError:
        return None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return None
    return lock


def _server_of(session: Path) -> str | None:
    """The server a session's requests were meant for (its ``meta.msgpack``), None when unknown."""
    try:
        return normal_url(str(msgpack.unpackb((session / "meta.msgpack").read_bytes(), raw=False)["server"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_runs(session: Path) -> dict[str, RunState]:
    """What the server said about the session's runs (``runs.msgpack``); empty when unknown."""
    try:
        state = msgpack.unpackb((session / "runs.msgpack").read_bytes(), raw=False)
        return {run: RunState(s["name"], s["offset"]) for run, s in state.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _request_files(session: Path) -> list[Path]:
    return sorted(session.glob("[0-9]*-*.msgpack"))


def _read_requests(session: Path) -> list[Entry]:
    """The session's requests, oldest first; an unreadable file is logged and left in place."""
    entries = []
    for path in _request_files(session):
        try:
            entries.append(Entry.unpack(int(path.name.split("-", 1)[0]), path.read_bytes(), path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("sonde: unreadable spill file %s (%s); left in place", path, exc)
    return entries


def _clear(session: Path) -> None:
    """Remove what an abandoned session keeps besides its requests, then the session if it is empty."""
    for leftover in session.iterdir():
        if leftover.name.startswith(("lock", "meta", "runs", ".tmp-")):
            with contextlib.suppress(OSError):
                leftover.unlink()
    with contextlib.suppress(OSError):
        session.rmdir()


def adopt_session(session: Path, *, into: Outbox, server: str | None) -> int:
    """Move the requests of an abandoned session (its process gone) into ``into``; returns how many.

    Sessions of another server are left alone unless ``server`` is None. A session whose lock is
    held belongs to a live process and is skipped. A session the disk cannot take in (``into``
    cannot write its own files) stays where it is, for later.
    """
    lock = _claim(session)
    if lock is None:
        return 0
    try:
        if not _request_files(session):
            _clear(session)  # nothing to send, whichever server it was for
            return 0
        if server is not None and _server_of(session) != normal_url(server):
            return 0
        entries = _read_requests(session)
        moved = 0
        with into._cond:
            try:
                into._save_meta()
            except OSError as exc:
                log.error("sonde: cannot take in the spilled requests of %s (%s); they stay there", session, exc)
                return 0
            for run, state in _read_runs(session).items():
                into.runs.setdefault(run, state)
            for entry in entries:
                assert entry.file is not None
                target = into.dir / f"{into._seq + 1:012d}-{entry.kind}.msgpack"
                try:
                    os.replace(entry.file, target)
                except OSError as exc:  # the rest stays, in order, for a later session
                    log.error("sonde: cannot move %s to %s (%s); it and the requests after it stay there",
                              entry.file, target, exc)
                    break
                into._seq += 1
                entry.seq, entry.file = into._seq, target
                into._disk.append(entry)
                moved += 1
            _fsync_dir(into.dir)
            if into.runs:
                with contextlib.suppress(OSError):  # written again at close, or reported there
                    into._save_runs()
        if moved == len(entries):
            _clear(session)
        return moved
    finally:
        lock.close()


def replay(spill_dir: str | Path = DEFAULT_SPILL_DIR, server: str | None = None, *, token: str | None = None,
           timeout: float = 60.0, client: httpx.Client | None = None) -> int:
    """Send the requests spilled by earlier remote probes; returns how many are still left.

    Every abandoned session under ``spill_dir`` goes to the server it was meant for, or to
    ``server`` when given, oldest session first; each is sent from where it lies, so a full disk
    does not stop a replay. Sessions of running probes are left to them.

    Example:
        >>> replay("sonde-spill")                                  # doctest: +SKIP
        0
    """
    root = Path(spill_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"no spill directory at '{root}'")
    deadline = time.monotonic() + timeout
    token = token or os.environ.get("SONDE_TOKEN")
    left = 0
    stuck: set[str] = set()  # servers that did not take a whole session: later sessions wait (order is kept)
    for session in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "rejected"):
        waiting = len(_request_files(session))
        target = normal_url(server) if server else _server_of(session)
        if target is None or target in stuck:
            if target is None and waiting:
                log.error("sonde: %s holds %d spilled request(s) but does not say for which server; pass the "
                          "server (sonde replay --server URL)", session, waiting)
            left += waiting
            continue
        try:
            outbox = Outbox(target, root, token=token, client=client, adopt=False, start=False, session=session)
        except ConfigError:  # a running probe's session: that probe sends it
            continue
        outbox._thread.start()
        still = outbox.close(max(0.0, deadline - time.monotonic()))
        if still:
            stuck.add(target)
        left += still
    return left
