"""One rank of the two-rank runs of test_distributed_checks.py (launched by the test with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, from the test's temporary directory).

Usage: ``python rank_checks_child.py MODE OUT``:

* ``checks``: four runs of the DDP model of distributed_child.py, one after the other:
  ``per_rank.db`` (``per_rank=True``, nothing out of sync), ``desync.db`` (rank 1 adds 1e-3 to
  layer ``2``'s weight after the optimizer step of step 3), ``broken.db`` (a metric whose update
  raises on rank 1 only, at its second call) and an unprobed run; ``OUT/rank<r>.json`` holds the
  run names, whether monitoring switched off, and the losses of the broken and the unprobed runs.
* ``crash``: a process group with a 20 s timeout; rank 1 raises in its training loop at step 3,
  between the forward and the backward, inside the probe's ``with`` block; a rank that got out of
  its loop with an error writes it to ``OUT/crash<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import distributed_child as child
import ranks
import torch
import torch.distributed as dist
from torch import nn

import sonde
from sonde.metrics import Metric
from sonde.metrics.base import Capture

DESYNC_STEPS = 6
DESYNC_AT = 3  # rank 1 shifts layer "2"'s weight after this step's optimizer step
CRASH_AT = 3


class FailsOnRankOne(Metric):
    """A mean of the activations whose update raises on rank 1 at its second call."""

    name = "fragile"
    topics = ("activations",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=0.0, reduce="sum")
        self.calls = 0

    def update(self, capture: Capture) -> None:
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == 2:
            raise RuntimeError("injected failure in a metric's update")
        self.stage("total", capture.tensor.detach().double().sum())

    def compute(self) -> dict[str, Any]:
        return {"fragile": float(self.state["total"])}


def ddp() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.parallel.DistributedDataParallel(child.make_net())
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, probe: Any, steps: int,
          desync_at: int | None = None, crash_at: int | None = None) -> list[float]:
    rank, size = dist.get_rank(), dist.get_world_size()
    share = child.GLOBAL_BATCH // size
    losses = []
    for step in range(steps):
        x, y = child.global_batch(step % 3)
        xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        loss = nn.functional.cross_entropy(model(xs), ys)
        if crash_at is not None and step == crash_at and rank == 1:
            raise RuntimeError("user code failed on rank 1")  # after the forward, before the backward
        opt.zero_grad()
        loss.backward()
        opt.step()
        if desync_at is not None and step == desync_at and rank == 1:
            with torch.no_grad():
                model.module[2].weight[0, 0] += 1e-3  # type: ignore[index]
        if probe is not None:
            probe.log(loss=loss)
        losses.append(loss.item())
    return losses


def checks(out: Path) -> None:
    rank = dist.get_rank()
    model, opt = ddp()
    with sonde.probe(model, optimizer=opt, store="per_rank.db", per_rank=True) as p:
        train(model, opt, p, child.STEPS)
        per_rank_run = p.run
    model, opt = ddp()
    with sonde.probe(model, optimizer=opt, store="desync.db", topics=["activations", "weights"]) as p:
        train(model, opt, p, DESYNC_STEPS, desync_at=DESYNC_AT)
        desync_run = p.run
    model, opt = ddp()
    with sonde.probe(model, optimizer=opt, store="broken.db", metrics=["mean", FailsOnRankOne()]) as p:
        broken = train(model, opt, p, child.STEPS)
        switched_off = p.switched_off
    model, opt = ddp()
    unprobed = train(model, opt, None, child.STEPS)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "per_rank_run": per_rank_run, "desync_run": desync_run, "switched_off": switched_off,
        "broken_losses": broken, "unprobed_losses": unprobed}))


def crash(out: Path) -> None:
    rank = dist.get_rank()
    model, opt = ddp()
    started = time.monotonic()
    try:
        with sonde.probe(model, optimizer=opt, store="crash.db") as p:
            train(model, opt, p, 2 * CRASH_AT, crash_at=CRASH_AT)
    except Exception as exc:
        (out / f"crash{rank}.json").write_text(json.dumps({
            "error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}))
        raise


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    {"checks": checks, "crash": crash}[mode](out)
    if mode == "checks":
        dist.barrier()  # both ranks done with the group before it is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks.run(main, sys.argv[1], Path(sys.argv[2]))
