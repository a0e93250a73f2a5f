"""One rank of the Lightning DDP run of test_distributed_lightning.py: a ``Trainer`` with
``strategy="ddp"`` on two CPU processes that the test launches (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, so Lightning creates no processes of its own), probed by
``sonde.lightning.SondeCallback`` with no extra argument; the store is ``./sonde.db``.

Usage: ``python lightning_ddp_child.py ddp OUT``; each rank writes ``OUT/rank<r>.json`` with its run name.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import ranks
import torch
from torch import nn

from sonde.lightning import SondeCallback

SAMPLES = 32
GLOBAL_BATCH = 8  # 4 per rank
LR = 0.1


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 4, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (SAMPLES,), generator=g))


class Classifier(L.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def main(out: Path) -> None:
    callback = SondeCallback()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    # Rank r reads samples r, r + 2, ...: each step's two shares are the global batch 8k ... 8k + 7.
    sampler = torch.utils.data.DistributedSampler(dataset(), num_replicas=2, rank=int(os.environ["RANK"]),
                                                  shuffle=False)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=GLOBAL_BATCH // 2, sampler=sampler)
    runs: list[str] = []
    original = callback.on_fit_end

    def remember(trainer: Any, pl_module: Any) -> None:
        probe = callback.probe
        runs.append(probe.run if probe is not None else "")
        original(trainer, pl_module)

    callback.on_fit_end = remember  # type: ignore[method-assign]
    trainer.fit(Classifier(), loader)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"run": runs[0], "world": trainer.world_size}))
    # Tear the group down with both ranks done (a gloo group left to the interpreter's exit can abort a rank
    # whose peer has already closed the connection).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks.run(main, Path(sys.argv[2]))
