"""Under torch.distributed the overhead budget takes one decision for every rank (two gloo ranks on
the CPU): the ranks measure different costs, yet record the same steps; trouble seen on one rank
makes every rank record the following steps in full."""

from __future__ import annotations

import json
from pathlib import Path

from ranks import launch

CHILD = Path(__file__).with_name("budget_ranks_child.py")


def test_the_ranks_adopt_one_schedule(tmp_path: Path) -> None:
    launch(CHILD, [str(tmp_path)], tmp_path, 120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["recorded"] == ranks[1]["recorded"]
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    # rank 1 pays 38% per recorded step: one step in 8 (4.75%); the sparser proposal wins, once the
    # warm-up and the trouble window below are paid back (sparser steps in between)
    assert ranks[0]["schedule"]["stats"] == 8
    recorded = ranks[0]["recorded"]
    assert recorded[:10] == [0, 1, 2, 3, 4, 5, 6, 8, 10, 12]
    assert all(k % 8 == 0 for k in recorded if k >= 280)
    # rank 1's NaN at step 100 reaches rank 0 at the next recorded step: the 5 steps after the one
    # already answered are recorded in full on both ranks
    seen = min(k for k in recorded if k >= 100)
    assert [k for k in recorded if seen <= k <= seen + 6] == [seen, *range(seen + 2, seen + 7)]
