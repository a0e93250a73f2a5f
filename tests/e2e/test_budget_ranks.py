"""Under torch.distributed the overhead budget takes one decision for every rank (two gloo ranks on
the CPU): the ranks measure different costs, yet record the same steps; trouble seen on one rank
makes every rank record the following steps in full."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_distributed import free_port

CHILD = Path(__file__).with_name("budget_ranks_child.py")


def test_the_ranks_adopt_one_schedule(tmp_path: Path) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(CHILD), str(tmp_path)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(e[-3000:] for e in errors)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["recorded"] == ranks[1]["recorded"]
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    # rank 1 pays 38% per recorded step: one step in 8 (4.75%); the sparser proposal wins
    assert ranks[0]["schedule"]["stats"] == 8
    recorded = ranks[0]["recorded"]
    assert recorded[:8] == list(range(8))
    # rank 1's NaN at step 100 reaches rank 0 at the next recorded step (104): steps 106-110 in full
    assert [k for k in recorded if 100 <= k < 120] == [104, 106, 107, 108, 109, 110, 112]
