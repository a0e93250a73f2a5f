"""Two ranks on the CPU (gloo) probing a DDP model: the checks across ranks (parameters out of sync,
each rank's own activations with ``per_rank=True``), a monitoring failure on one rank, and a rank
whose training raises.

Expected values are computed here, independently of sonde: the per-rank statistics with numpy on
each rank's share of the global batch run through the same network by plain torch
(:func:`test_distributed.reference`), the losses by an unprobed run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import distributed_child as child
import numpy as np
import pytest
import rank_checks_child as checks
import ranks
import torch
from ranks import succeeded
from test_distributed import numpy_stats, reference
from torch import nn

import sonde
from sonde.store import open_store

CHILD = Path(__file__).with_name("rank_checks_child.py")
LIGHTNING_CHILD = Path(__file__).with_name("lightning_ddp_child.py")
TIMEOUT = 120  # the whole launch; the crash mode's process group times out after 20 s


def launch(mode: str, tmp_path: Path, script: Path = CHILD) -> tuple[list[subprocess.CompletedProcess[str]], float]:
    """Both ranks of ``script mode tmp_path``, from ``tmp_path``; their results and the seconds until
    both exited (killed after TIMEOUT seconds, which fails the test)."""
    return ranks.launch(script, [mode, str(tmp_path)], tmp_path, TIMEOUT, check=False)


def test_desync_alert_per_rank_values_and_a_failing_metric(tmp_path: Path) -> None:
    results, _ = launch("checks", tmp_path)
    succeeded(results)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # Out of sync: exactly one alert, at the step rank 1 changed layer "2", naming that layer.
    df = sonde.load(tmp_path / "desync.db", messages=True)
    alerts = df[df["metric"] == "alert"]
    assert len(alerts) == 1, alerts
    alert = alerts.iloc[0]
    assert (alert["step"], alert["layer"], alert["topic"]) == (checks.DESYNC_AT, "2", "weights")
    assert "layer '2'" in alert["message"] and "out of sync" in alert["message"]
    assert "ranks out of sync" in results[0].stderr  # logged once, by rank 0
    assert "ranks out of sync" not in results[1].stderr
    assert sorted(set(df[df["phase"] == "train"]["step"])) == list(range(checks.DESYNC_STEPS))  # training went on

    # Runs with the ranks in step raise none.
    for store in ("per_rank.db", "broken.db"):
        loaded = sonde.load(tmp_path / store)
        assert not (loaded["metric"] == "alert").any(), store

    # per_rank=True: each rank's own activations, beside the merged ones, as <layer>@rank<r>.
    ref = reference()
    per_rank = sonde.load(tmp_path / "per_rank.db")
    assert set(per_rank["run"]) == {ranks[0]["per_rank_run"]}
    keys = per_rank[["step", "phase", "layer", "topic", "metric"]].astype(str).agg("|".join, axis=1)
    assert keys.is_unique
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in per_rank.itertuples()}
    share = child.GLOBAL_BATCH // 2
    compared = 0
    for step in range(child.STEPS):
        for layer in ("0", "1", "2"):
            whole = ref[(step, layer, "activations")]
            for metric, expected in numpy_stats(whole).items():  # the merged values are still the global batch's
                assert values[(step, layer, "activations", metric)] == pytest.approx(expected, rel=1e-5, abs=1e-7)
            for rank in range(2):
                own = whole[rank * share : (rank + 1) * share]
                for metric, expected in numpy_stats(own).items():
                    got = values[(step, f"{layer}@rank{rank}", "activations", metric)]
                    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (step, layer, rank, metric)
                    compared += 1
    assert compared == child.STEPS * 3 * 2 * 8
    # Only activations are recorded per rank; the per-rank layers are declared with the run.
    ranked = per_rank[per_rank["layer"].str.contains("@rank")]
    assert set(ranked["topic"]) == {"activations"}
    layers = open_store(tmp_path / "per_rank.db").layers(ranks[0]["per_rank_run"])["name"].tolist()
    assert layers == ["0", "1", "2", *(f"{la}@rank{r}" for r in range(2) for la in ("0", "1", "2"))]

    # A metric failing on rank 1 only: monitoring switches off on both ranks, training is unchanged.
    assert all(r["switched_off"] for r in ranks)
    assert "injected failure in a metric's update" in results[1].stderr
    assert "switched off on every rank" in results[0].stderr
    for r in ranks:
        assert len(r["broken_losses"]) == child.STEPS
        assert r["broken_losses"] == r["unprobed_losses"]  # bit for bit
    broken = sonde.load(tmp_path / "broken.db")
    assert sorted(set(broken[broken["phase"] == "train"]["step"])) == [0]  # recorded until the failure


def test_a_rank_that_raises_in_its_step_lets_the_other_exit(tmp_path: Path) -> None:
    """Rank 1 raises between its forward and its backward: rank 0, waiting in DDP's all-reduce,
    fails with the process group's error within its timeout (20 s); sonde adds no hang."""
    results, seconds = launch("crash", tmp_path)
    assert results[1].returncode != 0 and "user code failed on rank 1" in results[1].stderr
    assert results[0].returncode != 0  # the survivor exits with an error instead of waiting forever
    survivor = json.loads((tmp_path / "crash0.json").read_text())
    assert survivor["error"].startswith("RuntimeError")  # out of its training loop, through the probe's `with`
    # The failing rank leaves with its own error: closing the probe on an error makes no collective
    # (one would meet rank 0's all-reduce of DDP: a collective mismatch that aborts the process).
    assert json.loads((tmp_path / "crash1.json").read_text())["error"] == "RuntimeError: user code failed on rank 1"
    assert "mismatch" not in results[1].stderr and results[1].returncode == 1
    assert seconds < TIMEOUT


def test_lightning_ddp_records_once_what_one_process_records_on_the_global_batch(tmp_path: Path) -> None:
    """``Trainer(strategy="ddp", devices=2)`` with ``SondeCallback()`` and nothing else: one run,
    each Record once, the statistics of one process training on the global batches."""
    pytest.importorskip("lightning")
    import lightning_ddp_child as lit

    results, _ = launch("ddp", tmp_path, LIGHTNING_CHILD)
    succeeded(results)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["run"] == ranks[1]["run"]
    df = sonde.load(tmp_path / "sonde.db")
    assert set(df["run"]) == {ranks[0]["run"]}
    keys = df[["step", "phase", "layer", "topic", "metric"]].astype(str).agg("|".join, axis=1)
    assert keys.is_unique

    # One process, plain torch: the same network and SGD on the global batches 8k ... 8k + 7.
    net = lit.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=lit.LR)
    x, y = lit.dataset().tensors
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    step = 0

    def hook(name: str) -> Any:
        def forward(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            at = step
            seen[(at, name, "activations")] = output.detach().double().numpy().copy()
            output.register_hook(lambda g: seen.__setitem__((at, name, "output_grads"), g.double().numpy().copy()))
        return forward

    for name, module in net.named_children():
        module.register_forward_hook(hook(f"net.{name}"))
    steps = lit.SAMPLES // lit.GLOBAL_BATCH
    for step in range(steps):
        batch = slice(step * lit.GLOBAL_BATCH, (step + 1) * lit.GLOBAL_BATCH)
        for layer in ("net.0", "net.2"):
            weight = net.get_submodule(layer.removeprefix("net.")).weight
            seen[(step, layer, "weights")] = weight.detach().double().numpy().copy()
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen[(step, "", "loss")] = np.array(loss.item())

    train = df[df["phase"] == "train"]
    assert sorted(set(train["step"])) == list(range(steps))
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in train.itertuples()}
    compared = 0
    for (at, layer, topic), tensor in seen.items():
        if topic == "loss":
            assert values[(at, "", "loss", "loss")] == pytest.approx(float(tensor), rel=1e-6)
            continue
        for metric, expected in numpy_stats(tensor).items():
            got = values[(at, layer, topic, metric)]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (at, layer, topic, metric)
            compared += 1
    assert compared == steps * (3 * 2 + 2) * 8
    with open_store(tmp_path / "sonde.db") as store:  # the graph, traced by rank 0, named like the layers
        graph = store.get_graph(ranks[0]["run"])
    assert graph is not None
    assert {n["name"] for n in graph["nodes"] if n["kind"] == "module"} >= {"net.0", "net.1", "net.2"}
