"""Stores that cannot be written are read: load, export and serve work; writes say the store is read-only.

The read-only condition is real: ``chmod`` for an ordinary user; for root (whom ``chmod`` does not
stop) the immutable attribute (``chattr +i``) on the file and its directory, or a read-only bind
mount in a private mount namespace (``unshare -m``). Only where none of these exist is the
writability check simulated.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import sonde
from sonde.cli import main
from sonde.errors import StoreError
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo
from sonde.sinks.store import StoreSink
from sonde.store import open_store
from sonde.store.schema import SCHEMA_VERSION


def _record(step: int, metric: str = "norm", value: float = 1.0) -> Record:
    return Record("r", step, "train", "fc1", "weights", metric, value)


def _recorded(directory: Path, name: str = "ro.db") -> Path:
    """A store with one finished run of 3 steps, closed (checkpointed: no -wal file left)."""
    path = directory / name
    with open_store(path) as store:
        store.start_run(RunInfo("r", model="MLP", layers=[LayerInfo("fc1", "Linear")]), resume=False)
        store.write("r", [_record(s, value=float(s)) for s in range(3)])
        store.finish_run("r", "finished")
    assert not path.with_name(name + "-wal").exists()
    return path


def _chattr(flag: str, paths: list[Path]) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    done = subprocess.run([chattr, flag, *map(str, paths)], capture_output=True)
    return done.returncode == 0


@contextmanager
def unwritable(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``paths`` (files and directories) cannot be written by this process inside the block; yields how."""
    if os.geteuid() != 0:
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if _chattr("+i", paths):
        try:
            yield "chattr"
        finally:
            _chattr("-i", paths)
        return
    denied = {str(p.resolve()) for p in paths}
    real_access = os.access

    def access(path: str | os.PathLike[str], mode: int, **kwargs: object) -> bool:
        if mode & os.W_OK and str(Path(path).resolve()) in denied:
            return False
        return real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("sonde.store.engine.os.access", access)
    yield "simulated"


def _get(store_path: Path, url: str) -> httpx.Response:
    from sonde.server.app import create_app

    app = create_app(str(store_path), ui=False)  # what `sonde serve --store ro.db` builds

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.get(url)

    try:
        return asyncio.run(go())
    finally:
        app.state.store.close()


def test_a_checkpointed_store_in_a_read_only_directory_is_loaded_served_and_exported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = _recorded(directory)
    out = tmp_path / "out"
    out.mkdir()
    with unwritable([path, directory], monkeypatch):
        df = sonde.load(path, run="r")
        assert df["value"].tolist() == [0.0, 1.0, 2.0]
        with open_store(path) as store:
            assert store.read_only and not open_store(tmp_path / "w.db").read_only
            assert store.runs()[["name", "status", "steps"]].values.tolist() == [["r", "finished", 3]]
            assert store.layers("r")["name"].tolist() == ["fc1"]
            assert store.series("r", "fc1", "weights", "norm")["value"] == [0.0, 1.0, 2.0]
        runs = _get(path, "/api/v1/runs")
        assert runs.status_code == 200, runs.text
        assert [(r["name"], r["status"], r["steps"]) for r in runs.json()] == [("r", "finished", 3)]
        assert main(["export", "r", "--store", str(path), "--csv", str(out / "r.csv")]) == 0
        assert sorted(os.listdir(directory)) == ["ro.db"]  # no -wal or -shm could be, or was, created there
    assert (out / "r.csv").read_text().count("\n") == 4  # header and 3 records


def test_writing_to_a_read_only_store_says_it_is_read_only_and_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = _recorded(directory)
    with unwritable([path, directory], monkeypatch), open_store(path) as store:
        writes = [
            lambda: store.start_run(RunInfo("new"), resume=False),
            lambda: store.start_run(RunInfo("r"), resume=True),
            lambda: store.write("r", [_record(3)]),
            lambda: store.write_batch("r", "b1", [_record(3)]),
            lambda: store.finish_run("r", "failed"),
            lambda: store.heartbeat("r"),
            lambda: store.put_graph("r", {"nodes": []}),
            lambda: store.delete_run("r"),
        ]
        for write in writes:
            with pytest.raises(StoreError, match=rf"'{path}' is read-only"):
                write()
        with pytest.raises(StoreError, match="read-only"):
            StoreSink(path).open(RunInfo("new"))  # what sonde.probe(model, store=path) does first
        assert store.runs()["status"].tolist() == ["finished"] and len(store.load("r")) == 3


def test_a_read_only_server_refuses_writes_with_405_and_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sonde.server.app import create_app

    directory = tmp_path / "ro"
    directory.mkdir()
    path = _recorded(directory)
    with unwritable([path, directory], monkeypatch):
        app = create_app(str(path), ui=False)

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
                return [await client.post("/api/v1/runs", json={"name": "new"}),
                        await client.post("/api/v1/runs/r/finish", json={"status": "failed"}),
                        await client.get("/api/v1/runs/r")]

        try:
            created, finished, shown = asyncio.run(go())
        finally:
            app.state.store.close()
    for refused in (created, finished):
        assert refused.status_code == 405 and "read-only" in refused.json()["error"]
    assert shown.status_code == 200 and shown.json()["status"] == "finished"


def test_a_read_only_file_in_a_writable_directory_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _recorded(tmp_path)
    with unwritable([path], monkeypatch), open_store(path) as store:
        assert store.read_only and len(store.load("r")) == 3
        with pytest.raises(StoreError, match="read-only"):
            store.write("r", [_record(3)])


def test_unflushed_transactions_of_a_read_only_copy_are_read_from_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live = tmp_path / "live"
    live.mkdir()
    copy = tmp_path / "copy"
    copy.mkdir()
    path = _recorded(live)
    with open_store(path) as store:  # a writer still open: its last batch is only in the -wal file
        store.start_run(RunInfo("late"), resume=False)
        store.write("late", [Record("late", 0, "train", "fc1", "weights", "norm", 5.0)])
        files = sorted(p.name for p in live.iterdir())
        assert files == ["ro.db", "ro.db-shm", "ro.db-wal"]
        for name in files:
            shutil.copy2(live / name, copy / name)
    with unwritable([copy, *copy.iterdir()], monkeypatch), open_store(copy / "ro.db") as store:
        assert store.read_only
        assert store.load("late")["value"].tolist() == [5.0]


def test_a_read_only_store_of_the_previous_schema_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = _recorded(directory)
    with sqlite3.connect(path) as conn:  # as sonde wrote it before runs had a heartbeat (version 4)
        conn.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")
        conn.execute("DELETE FROM schema_version WHERE version > 4")
    assert SCHEMA_VERSION == 5
    with unwritable([path, directory], monkeypatch), open_store(path) as store:
        assert store.run_info("r")["status"] == "finished"  # type: ignore[index]
        assert store.runs()["name"].tolist() == ["r"] and len(store.load("r")) == 3


def test_a_read_only_store_too_old_to_read_or_no_store_at_all_is_explained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    old = _recorded(directory, "old.db")
    with sqlite3.connect(old) as conn:
        conn.execute("DELETE FROM schema_version WHERE version > 3")
    other = directory / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (a INTEGER)")
    with unwritable([old, other, directory], monkeypatch):
        with pytest.raises(StoreError, match=r"read-only sonde store .*old\.db.*schema version 3.*open it once"):
            open_store(old)
        with pytest.raises(StoreError, match=r"other\.db.*no sonde tables"):
            open_store(other)


def test_a_store_on_a_read_only_mount_is_loaded_in_another_process(tmp_path: Path) -> None:
    """The case as users meet it: a read-only bind mount (in a private mount namespace: nothing leaks)."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None:
        pytest.skip("needs unshare and mount")
    source, target = tmp_path / "data", tmp_path / "mnt"
    source.mkdir()
    target.mkdir()
    _recorded(source)
    script = f"""
set -e
{mount} --bind {source} {target}
{mount} -o remount,bind,ro {target}
touch {target}/probe 2>/dev/null && {{ echo "the mount is writable"; exit 3; }}
{sys.executable} -c 'import sonde; print(sonde.load("{target}/ro.db", run="r")["value"].tolist())'
{sys.executable} -m sonde.cli export r --store {target}/ro.db --csv {tmp_path}/r.csv
"""
    done = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0 and "unshare" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip(f"no mount namespaces here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[0.0, 1.0, 2.0]" in done.stdout
    assert (tmp_path / "r.csv").read_text().count("\n") == 4

