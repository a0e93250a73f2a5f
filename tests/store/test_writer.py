"""The store's single writer: every write, from whichever thread, runs on the one writer thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from sqlalchemy import event, text

from sonde.errors import ConfigError, StoreError
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo
from sonde.sinks.base import SinkRunner
from sonde.sinks.store import StoreSink
from sonde.store import Store, open_store
from sonde.store.engine import sqlite_engine

_WRITES = ("INSERT", "UPDATE", "DELETE")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "sonde.db") as s:
        yield s


def _watch(store: Store) -> tuple[list[tuple[int, str]], list[str]]:
    """Record the thread of every write statement, and the name of every thread that submits a write."""
    statements: list[tuple[int, str]] = []
    callers: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith(_WRITES):
            statements.append((threading.get_ident(), statement))

    submit = store.writer.submit

    def recording_submit(fn: Callable[[Any], Any]) -> Any:
        callers.append(threading.current_thread().name)
        return submit(fn)

    store.writer.submit = recording_submit  # type: ignore[method-assign]
    return statements, callers


def _post(app: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


def test_writes_from_sink_heartbeat_api_and_workers_all_run_on_the_writer_thread(store: Store) -> None:
    from sonde.server.app import create_app

    statements, callers = _watch(store)
    # The sink thread (records), the store sink's heartbeat thread (beats) ...
    runner = SinkRunner(StoreSink(store, heartbeat=0.01, max_delay=0.01))
    runner.sink.open(RunInfo("probe", layers=[LayerInfo("fc1", "Linear")]))
    for step in range(5):
        runner.submit([Record("probe", step, "train", "fc1", "weights", "norm", float(step))])
        time.sleep(0.02)
    runner.flush()
    # ... the API's thread pool (a remote probe's run and batches) ...
    app = create_app(store, ui=False)
    created = _post(app, "POST", "/api/v1/runs", json={"name": "remote", "layers": [{"name": "fc1", "type": "L"}]})
    assert created.status_code == 201, created.text
    for step in range(3):
        rows = [[step, "train", "fc1", "weights", "norm", 1.0]]
        body = msgpack.packb({"batch_id": str(uuid.uuid4()), "records": rows})
        response = _post(app, "POST", "/api/v1/runs/remote/records", content=body,
                         headers={"content-type": "application/msgpack"})
        assert response.status_code == 200, response.text
    # ... and worker threads like the evaluator's, all at once.
    with ThreadPoolExecutor(4, thread_name_prefix="worker") as pool:
        done = [pool.submit(store.write, "remote", [Record("remote", 10 + i, "train", "fc1", "weights", "mean", 0.5)])
                for i in range(8)]
        done += [pool.submit(store.heartbeat, "remote") for _ in range(8)]
        done.append(pool.submit(store.put_graph, "remote", {"nodes": []}))
        for future in done:
            future.result()
    runner.close("finished")

    writer = store.writer.ident
    assert writer is not None and writer != threading.get_ident()
    assert statements and {ident for ident, _ in statements} == {writer}
    assert any(s.startswith("UPDATE runs SET heartbeat_at") for _, s in statements)  # the beats are there too
    names = set(callers)
    assert {"sonde-sink-store", "sonde-heartbeat"} <= names
    assert any(name.startswith("AnyIO worker") for name in names), names  # the API's thread pool
    assert any(name.startswith("worker") for name in names), names
    assert store.writer.name not in names  # nothing submits from the writer itself
    assert len(store.load("remote")) == 11 and len(store.load("probe")) == 5


def test_a_write_error_reaches_the_caller_and_the_writer_goes_on(store: Store) -> None:
    store.start_run(RunInfo("r"), resume=False)
    with ThreadPoolExecutor(1) as pool:  # raised in the thread that asked, not on the writer
        with pytest.raises(ConfigError, match="no run 'missing'"):
            pool.submit(store.finish_run, "missing").result()
    with pytest.raises(StoreError, match="value must be a float"):
        store.write("r", [Record("r", 0, "train", "fc1", "weights", "norm", 1.0),
                          Record("r", 1, "train", "fc1", "weights", "norm", "high")])  # type: ignore[arg-type]
    with pytest.raises(ZeroDivisionError):
        store.writer.call(lambda conn: conn.execute(text("DELETE FROM runs")) and 1 / 0)
    # Nothing of a failed write was kept (the batch, the delete), and the writer still writes.
    assert store.load("r").empty and store.has_run("r")
    store.write("r", [Record("r", 2, "train", "fc1", "weights", "norm", 2.0)])
    assert store.load("r")["value"].tolist() == [2.0]


def test_close_waits_for_queued_writes_and_a_later_write_starts_the_writer_again(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    store.start_run(RunInfo("r"), resume=False)
    futures = [store.writer.submit(lambda conn, i=i: conn.execute(
        text("UPDATE runs SET last_step = :i"), {"i": i})) for i in range(50)]
    store.close()
    assert all(f.done() and f.exception() is None for f in futures) and store.writer.ident is None
    with sqlite3.connect(tmp_path / "s.db") as conn:  # on disk, as another process sees it
        assert conn.execute("SELECT last_step FROM runs").fetchone()[0] == 49
    store.heartbeat("r")  # after close: the writer starts again rather than losing the write
    assert store.writer.ident is not None
    store.close()


def test_an_in_memory_store_reads_and_writes_from_many_threads() -> None:
    with open_store("sqlite://") as store:
        store.start_run(RunInfo("r"), resume=False)

        def work(i: int) -> int:
            store.write("r", [Record("r", i, "train", "fc1", "weights", "norm", float(i))])
            return len(store.load("r"))

        with ThreadPoolExecutor(4) as pool:
            assert max(pool.map(work, range(20))) == 20
        assert sorted(store.load("r")["step"]) == list(range(20))


def test_a_store_only_read_starts_no_writer_and_read_only_refuses_before_submitting(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_store(path) as store:
        store.start_run(RunInfo("r"), resume=False)
    with open_store(path) as store:
        assert store.runs()["name"].tolist() == ["r"] and store.writer.ident is None
    engine = sqlite_engine(f"sqlite:///file:{path}?mode=ro&uri=true")  # as engine_for opens an unwritable file
    with Store(engine, str(path)) as store:
        assert store.read_only
        with pytest.raises(StoreError, match="read-only"):
            store.heartbeat("r")
        assert store.writer.ident is None
