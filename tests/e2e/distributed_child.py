"""One rank of the two-rank runs of test_distributed.py (launched by the test with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; run from the test's temporary directory, so the default
``./sonde.db`` is the store).

Usage: ``python distributed_child.py MODE OUT`` with MODE ``ddp`` (a DDP model with an optimizer, then
a second run into ``extra.db`` with a gathered state and a ``reset="never"`` mean) or
``fail`` (first a store rank 0 cannot open, then the DDP run with the merge failing on rank 1 at
the second recorded step); each rank writes ``OUT/rank<r>.json`` with the run name it was given,
whether monitoring was switched off and the error the bad store raised. MODE ``fsdp``: an FSDP2
model (:func:`fsdp`); ``hsdp``: the same with each parameter whole on both ranks (two replicas of one shard).
MODE ``eval``: a DDP model with evaluation passes over a validation set split unevenly across the
ranks (:func:`ddp_eval`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import ranks
import torch
import torch.distributed as dist
from torch import nn

import sonde
from sonde.metrics import Mean, Metric, Saturation, SpectralNorm
from sonde.metrics.base import Capture
from sonde.probe import distributed as sonde_distributed
from sonde.probe.core import Probe

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


VAL_ROWS = (5, 3)  # rank 0's and rank 1's rows of the validation set


def validation_set() -> torch.Tensor:
    return torch.randn(sum(VAL_ROWS), 4, generator=torch.Generator().manual_seed(300)) * 2


def evaluate(model: nn.Module, rows: torch.Tensor) -> None:
    """One evaluation pass: eval mode, no gradients, one batch; the model is put back in train mode."""
    model.eval()
    with torch.no_grad():
        model(rows)
    model.train()


def ddp_eval(out: Path) -> None:
    """DDP into ``eval.db``: train steps 0 and 1 (recorded), an evaluation pass (rank 0 evaluates 5
    rows of the validation set, rank 1 the other 3), train step 2 (not recorded), another evaluation
    pass, and the probe closes. Both passes follow a point where every rank merges (the recorded
    step 1, the close)."""
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = nn.parallel.DistributedDataParallel(make_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = sum(VAL_ROWS[:rank])
    rows = validation_set()[start : start + VAL_ROWS[rank]]
    share = GLOBAL_BATCH // size
    with sonde.probe(model, optimizer=opt, store="eval.db", every=lambda step: step != 2) as p:
        for step in range(STEPS):
            if step == 2:
                evaluate(model, rows)
            x, y = global_batch(step)
            loss = nn.functional.cross_entropy(model(x[rank * share : (rank + 1) * share]),
                                               y[rank * share : (rank + 1) * share])
            opt.zero_grad()
            loss.backward()
            opt.step()
        evaluate(model, rows)
    # read after the probe closed: the last pass is merged as it closes
    (out / f"rank{rank}.json").write_text(json.dumps({"run": p.run, "switched_off": p.switched_off}))
    dist.destroy_process_group()


def make_fsdp_net() -> nn.Sequential:
    """Parameters whose first dimension 2 ranks share unevenly (7, 3) and one (1) that leaves rank 1 an empty shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def fsdp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x).squeeze(-1), y.float())


def fsdp(out: Path, replicas: int = 1, optimizer: bool = True) -> None:
    """FSDP2: ``fully_shard`` on each Linear and on the root, over a CPU device mesh of ``replicas``
    replicas (HSDP when more than 1) of the shards; SGD with momentum, given to the probe or not
    (``optimizer``: gradients are then read as backward accumulates them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = (init_device_mesh("cpu", (size,)) if replicas == 1 else
            init_device_mesh("cpu", (replicas, size // replicas), mesh_dim_names=("replicate", "shard")))
    model = make_fsdp_net()
    for block in model:
        if isinstance(block, nn.Linear):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // size
    with sonde.probe(model, optimizer=opt if optimizer else None) as p:
        for step in range(STEPS):
            x, y = global_batch(step)
            loss = fsdp_loss(model, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
            opt.zero_grad()
            loss.backward()
            opt.step()
            p.log(loss=loss)
        run, switched_off = p.run, p.switched_off
        graph_error = "" if p._graph_job is None or p._graph_job.error is None else str(p._graph_job.error)
    (out / f"rank{rank}.json").write_text(json.dumps({"run": run, "switched_off": switched_off,
                                                      "graph_error": graph_error}))
    dist.destroy_process_group()


def main(mode: str, out: Path) -> None:
    if mode in ("fsdp", "hsdp", "fsdp-no-optimizer"):
        fsdp(out, replicas=2 if mode == "hsdp" else 1, optimizer=mode != "fsdp-no-optimizer")
        return
    if mode == "eval":
        ddp_eval(out)
        return
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
        # two more: the offloaded metrics, with the sums and copies a GPU keeps on the device kept
        # as tensors here too (spectral norms always; saturation in the second)
        for path in ("host", "device"):
            Saturation.device_types = ("cuda", "cpu") if path == "device" else ("cuda",)
            net = nn.parallel.DistributedDataParallel(make_net())
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            with sonde.probe(net, optimizer=opt, store=f"offloaded-{path}.db", topics=["weights", "activations"],
                             metrics=[SpectralNorm(where="device"),
                                      Saturation(compute_every=1, precision="float64", top_k=3)]) as p:
                train(net, opt, p, rank, size)
    after_merge: dict[str, object] = {}
    if mode == "fail":  # then a failure after a step's merge, on rank 1 only: both ranks go on
        if rank == 1:
            sonde_distributed.RankMerge._pack = original  # type: ignore[method-assign]
        emit, emitted = Probe._emit, []

        def failing_emit(self: Probe, records: list) -> None:  # type: ignore[type-arg]
            emitted.append(1)
            if rank == 1 and len(emitted) == 2:
                raise RuntimeError("injected failure after the merge")
            emit(self, records)

        Probe._emit = failing_emit  # type: ignore[method-assign]
        net = nn.parallel.DistributedDataParallel(make_net())
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with sonde.probe(net, optimizer=opt, store="after-merge.db", every=1) as p:
            train(net, opt, p, rank, size)
            after_merge = {"run": p.run, "switched_off": p.switched_off}
        Probe._emit = emit  # type: ignore[method-assign]
    (out / f"rank{rank}.json").write_text(json.dumps({"run": run, "switched_off": switched_off, "refused": refused,
                                                      "after_merge": after_merge}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks.run(main, sys.argv[1], Path(sys.argv[2]))
