"""Real servers for tests (imported as ``from servers import Running, SondeServe, free_port``).

``Running`` serves an app with uvicorn in a thread of the test process; ``SondeServe`` runs a
real ``sonde serve`` in a subprocess. Both can be stopped and started again on the same port.
This lives outside ``conftest.py`` for the same reason as ``collect.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

__all__ = ["Running", "SondeServe", "free_port", "serving"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """An app served by uvicorn in a thread, on a given port (so that it can be stopped and started again)."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn on a free port for the ``with`` block; yields its base URL."""
    running = Running(app)
    try:
        yield running.url
    finally:
        running.stop()


class SondeServe:
    """``sonde serve`` in a subprocess, on a fixed port and store, that can be killed and started again.

    Its output goes to ``log``; ``start`` returns once ``/api/v1/runs`` answers 200 and fails with the
    log's tail when the server exits or does not answer within 60 s.
    """

    def __init__(self, store: Path, log: Path, port: int | None = None) -> None:
        self.store, self.log = store, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SONDE_TOKEN", None)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sonde.cli", "serve", "--port", str(self.port), "--store", str(self.store)],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/runs", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sonde serve did not come up: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no goodbye, in-flight requests die with it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @classmethod
    @contextmanager
    def running(cls, store: Path, log: Path) -> Iterator[SondeServe]:
        """Started for the ``with`` block, stopped after it (also when starting failed)."""
        server = cls(store, log)
        try:
            server.start()
            yield server
        finally:
            server.stop()
