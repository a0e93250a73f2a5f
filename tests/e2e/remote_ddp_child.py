"""One rank of the two-rank runs of test_distributed_remote.py (launched by the test with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, from a temporary directory of its own).

Usage: ``python remote_ddp_child.py OUT URL RUN``: the DDP model of distributed_child.py trained on
the same global batches, probed with ``server=URL`` and ``run=RUN``; each rank writes
``OUT/rank<r>.json`` with the run name it was given and whether monitoring was switched off, and rank 0
``OUT/emitted.pkl`` with every Record it emitted (``collect.key`` of each, from a ``Collect`` sink beside
the server).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import distributed_child as child
import torch
import torch.distributed as dist
from torch import nn

import sonde

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/, for the shared in-memory sink
import ranks

from collect import Collect, key


def remote(out: Path, url: str, run: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = nn.parallel.DistributedDataParallel(child.make_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    collect = Collect()
    with sonde.probe(model, server=url, optimizer=opt, every=1, run=run, sinks=[collect]) as p:
        child.train(model, opt, p, rank, size)
        name, switched_off = p.run, p.switched_off
    if rank == 0:
        (out / "emitted.pkl").write_bytes(pickle.dumps([key(r) for r in collect.records]))
    (out / f"rank{rank}.json").write_text(json.dumps({"run": name, "switched_off": switched_off}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks.run(remote, Path(sys.argv[1]), sys.argv[2], sys.argv[3])
