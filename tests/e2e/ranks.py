"""Launching two gloo ranks on the CPU for the distributed tests: one place for the environment a
rank needs, the bounded wait (a hang fails the test instead of stalling the suite) and the report
of a rank that failed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def ranks_env(port: int, world: int = 2) -> list[dict[str, str]]:
    """What torchrun would set for each of ``world`` ranks meeting at ``port``."""
    return [{"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)} for rank in range(world)]


def run_all(commands: list[tuple[list[str], Path, dict[str, str]]], timeout: float, *,
            check: bool = True) -> tuple[list[subprocess.CompletedProcess[str]], float]:
    """Start every ``(argv, cwd, env)`` at once (one thread for torch each) and wait for all; returns
    their results and the seconds until all exited. A process still running after ``timeout``
    seconds is killed and fails the test; with ``check``, so does one that exits with an error."""
    started = time.monotonic()
    procs = [subprocess.Popen(argv, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, cwd, env in commands]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        hung = [proc for proc in procs if proc.poll() is None]
        for proc in hung:
            proc.kill()
            proc.wait()
    assert not hung, f"{len(hung)} process(es) still running after {timeout} s"
    if check:
        succeeded(done)
    return done, time.monotonic() - started


def launch(script: Path, args: list[str], cwd: Path, timeout: float, *,
           check: bool = True) -> tuple[list[subprocess.CompletedProcess[str]], float]:
    """Both ranks of ``python script *args``, from ``cwd`` (see :func:`run_all`)."""
    # Imported here: ``tests/`` is on the path of the test process, not of a rank's child, which
    # imports this module for :func:`leave` only.
    from servers import free_port

    argv = [sys.executable, str(script), *args]
    return run_all([(argv, cwd, env) for env in ranks_env(free_port())], timeout, check=check)


def succeeded(results: list[subprocess.CompletedProcess[str]]) -> None:
    failed = [f"{' '.join(map(str, r.args[1:]))} (exit {r.returncode}):\n{r.stderr[-3000:]}"
              for r in results if r.returncode]
    assert not failed, "\n".join(failed)


def run(main: Callable[..., None], *args: object) -> None:
    """Run a rank child's ``main(*args)``, then :func:`leave`: with status 0, or, where ``main``
    raised (a test that makes a rank fail), with its traceback printed and status 1, as the
    interpreter would have ended it, without the teardown that can abort a child whose process
    group is still up."""
    try:
        main(*args)
    except Exception:
        if os.environ.get("SONDE_TEST_RANKS_EXIT") == "interpreter":
            raise
        traceback.print_exc()
        leave(1)
    leave()


def leave(status: int = 0) -> None:
    """End a rank's child process once its work is done and written: output flushed, then
    ``os._exit(status)``, without the interpreter's teardown. A 2-rank gloo child has been seen to abort
    in that teardown ("terminate called without an active exception": a process group's worker
    thread freeing a tensor's Python object while the interpreter finalizes) a few times in a hundred
    runs on a loaded 2-core machine. sonde's own collectives keep their tensors referenced from
    Python (``sonde.probe.distributed._HELD``); the tensor freed in those aborts was not identified.

    ``SONDE_TEST_RANKS_EXIT=interpreter`` lets the children end as a user's script does, through
    the interpreter's teardown, to look for that abort (``make``'s tests leave it unset). So run
    on 2026-12-03, two loops at once on the 2-core machine, the distributed tests passed 12 times
    out of 12 (132 two-rank launches), and the same children run by hand 48 times out of 48."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("SONDE_TEST_RANKS_EXIT") == "interpreter":
        return
    os._exit(status)
