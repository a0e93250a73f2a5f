"""One rank of the two-rank runs of test_distributed.py (launched by the test with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; run from the test's temporary directory, so the default
``./sonde.db`` is the store).

Usage: ``python distributed_child.py MODE OUT`` with MODE ``ddp`` (a DDP model with an optimizer, then
a second run into ``extra.db`` with a gathered state and a ``reset="never"`` mean) or
``fail`` (first a store rank 0 cannot open, then the DDP run with the merge failing on rank 1 at
the second recorded step); each rank writes ``OUT/rank<r>.json`` with the run name it was given,
whether monitoring was switched off and the error the bad store raised.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import sonde
from sonde.metrics import Mean, Metric
from sonde.metrics.base import Capture
from sonde.probe import distributed as sonde_distributed

STEPS = 3
GLOBAL_BATCH = 8


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 4, generator=generator) * (1 + step)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return x, y


class Rows(Metric):
    """Every captured activation row, concatenated (a state merged by gathering, in rank order)."""

    name = "rows"
    topics = ("activations",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("rows", default=None, reduce="cat")

    def update(self, capture: Capture) -> None:
        self.stage("rows", capture.tensor.detach().clone())

    def compute(self) -> dict[str, Any]:
        return {"rows": np.asarray(self.state["rows"], dtype=np.float64).reshape(-1)}


def train(model: nn.Module, opt: torch.optim.Optimizer, probe: Any, rank: int, size: int) -> None:
    share = GLOBAL_BATCH // size
    for step in range(STEPS):
        x, y = global_batch(step)
        xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        loss = nn.functional.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe.log(loss=loss)


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    if mode == "fail" and rank == 1:
        original = sonde_distributed.RankMerge._pack
        calls = []

        def failing(self: sonde_distributed.RankMerge, due: list) -> object:  # type: ignore[type-arg]
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected monitoring failure")
            return original(self, due)

        sonde_distributed.RankMerge._pack = failing  # type: ignore[method-assign]
    model = nn.parallel.DistributedDataParallel(make_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refused = ""
    if mode == "fail":  # first a store rank 0 cannot open (rank 1's path is fine): every rank must fail
        bad = out / "not-a-dir" / "x.db" if rank == 0 else out / f"fine{rank}.db"
        if rank == 0:
            (out / "not-a-dir").write_text("a file where a directory should be")
        dist.barrier()
        try:
            with sonde.probe(model, optimizer=opt, store=str(bad)):
                pass
        except Exception as exc:  # noqa: BLE001 - reported to the test
            refused = f"{type(exc).__name__}: {exc}"
    with sonde.probe(model, optimizer=opt) as p:
        train(model, opt, p, rank, size)
        run, switched_off = p.run, p.switched_off
    if mode == "ddp":  # a second run: states gathered in rank order, and state kept across computes
        again = nn.parallel.DistributedDataParallel(make_net())
        opt = torch.optim.SGD(again.parameters(), lr=0.1)
        with sonde.probe(again, optimizer=opt, store="extra.db", topics=["activations"],
                         metrics=[Rows(), Mean(reset="never")]) as p:
            train(again, opt, p, rank, size)
    (out / f"rank{rank}.json").write_text(json.dumps({"run": run, "switched_off": switched_off, "refused": refused}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], Path(sys.argv[2]))
