"""One rank of tests/e2e/test_budget_ranks.py: a DDP model probed under the overhead budget.

Each rank's fake clock says recording costs something different (rank 1's recorded steps cost
twice rank 0's), and rank 1 alone logs a NaN loss at step 100. Writes ``OUT/rank<r>.json``: the
steps each rank recorded, its schedule and the steps it recorded at or after step 100.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python budget_ranks_child.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ranks
import torch
import torch.distributed as dist
from torch import nn

import sonde

STEPS = 300


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def background(self) -> float:
        return 0.0  # no CPU time of sonde's background threads


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    clock = Clock()
    cost = 0.0019 if rank == 0 else 0.0038  # 19% and 38% of a 10 ms step
    recorded = []
    with sonde.probe(model, optimizer=opt, store=None, every=None) as p:
        assert p.budget is not None
        p.budget.clock = clock
        p.budget.background = clock.background
        for k in range(STEPS):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            p._recorded(k + 1)  # what the adapter asks right after the optimizer step
            opt.zero_grad()
            p.log(loss=torch.tensor(float("nan")) if rank == 1 and k == 100 else loss.detach())
            if p._recorded(k):
                recorded.append(k)
            clock.now += 0.010 + (cost if p._recorded(k) else 0.0)
        schedule = p.schedule()
    (out / f"rank{rank}.json").write_text(json.dumps({"recorded": recorded, "schedule": schedule}))
    dist.destroy_process_group()


if __name__ == "__main__":
    ranks.run(main)
