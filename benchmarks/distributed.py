"""What sonde adds to DDP training: two ranks on the CPU (gloo), the anchor MLP of overhead.py.

Both ranks train the 4×1024 MLP of ``benchmarks/overhead.py`` under ``DistributedDataParallel``,
each on its half of a global batch of 256, SGD with momentum. Variants run side by side in the same
two processes, interleaved over rounds (each round runs every variant once): ``unmonitored`` DDP,
``sonde`` (the default probe: the overhead budget spaces the recorded steps) and ``sonde every=1``.
Rank 0 prints each variant's median per-step time, the ratio of its mean step time to unmonitored
DDP's, and, for the probed variants, the bytes sonde sent through the collectives per recorded step
(``RankMerge.last_bytes``: the control vector and the flat sum, max and min buffers; the default
metrics gather no objects) with the number of recorded steps. The first 3 steps of every variant
are not timed.

    python benchmarks/distributed.py [--steps 30] [--rounds 3] [--backend gloo]

With ``--backend nccl`` each rank uses ``cuda:<rank % device count>`` (two processes may share one GPU).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from overhead import mlp
from torch import nn

import sonde
from sonde.probe.distributed import RankMerge

VARIANTS = ("unmonitored", "sonde", "sonde every=1")
GLOBAL_BATCH = 256


def run_variant(variant: str, steps: int, device: torch.device, tmp: str) -> tuple[float, list[int]]:
    """(seconds per timed step, bytes of each recorded step's merge) on this rank."""
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net, x, y = mlp()
    share = GLOBAL_BATCH // size
    x, y = x[rank * share : (rank + 1) * share].to(device), y[rank * share : (rank + 1) * share].to(device)
    model = nn.parallel.DistributedDataParallel(net.to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    sent: list[int] = []
    probe: Any = None
    if variant != "unmonitored":
        probe = sonde.probe(model, optimizer=opt, store=os.path.join(tmp, f"{variant}.db"),
                            every=1 if variant == "sonde every=1" else None)
    merger = None if probe is None else probe.bus.engine.merge_ranks
    start = 0.0
    for i in range(steps + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        if isinstance(merger, RankMerge):
            merger.last_bytes = 0
        out = model(x)  # the probe merges the previous step here, at the start of this one
        if isinstance(merger, RankMerge) and merger.last_bytes and i > 0:
            sent.append(merger.last_bytes)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if probe is not None:
            probe.log(loss=loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if probe is not None:
        probe.close()
    return elapsed / steps, sent


def rank_main(args: argparse.Namespace) -> None:
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if args.backend == "nccl" else torch.device("cpu")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    sent: dict[str, list[int]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for variant in VARIANTS:
                dist.barrier()
                seconds, merged = run_variant(variant, args.steps, device, tmp)
                times[variant].append(seconds)
                sent[variant] = merged  # the last round's
    if rank == 0:
        print(f"2 ranks, {args.backend}, {device.type}: torch {torch.__version__}, 1 thread per rank, "
              f"{args.rounds} rounds x {args.steps} steps, global batch {GLOBAL_BATCH}")
        print(f"{'variant':16s} {'ms/step':>9s} {'mean ratio':>10s} {'recorded':>9s} {'bytes/recorded step':>20s}")
        base = sum(times["unmonitored"])
        for variant in VARIANTS:
            merged = sent[variant]
            size = f"{statistics.median(merged):.0f}" if merged else "-"
            print(f"{variant:16s} {statistics.median(times[variant]) * 1e3:9.2f} {sum(times[variant]) / base:9.3f}x "
                  f"{len(merged):9d} {size:>20s}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", "--steps", str(args.steps),
                                       "--rounds", str(args.rounds), "--backend", args.backend], env=env))
    sys.exit(max(proc.wait() for proc in procs))


if __name__ == "__main__":
    main()
