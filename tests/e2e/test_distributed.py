"""Two ranks on the CPU (gloo) probing a DDP model: one run written once by rank 0, with the values one
process computes on the concatenated (global) batch; a monitoring failure on one rank switches
monitoring off on both without hanging.

The reference is computed here, independently of sonde: one process runs the same network on the
global batch with plain torch hooks, and numpy takes the statistics.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import distributed_child as child
import numpy as np
import pytest
import ranks
import torch
from torch import nn

import sonde
from sonde.store import open_store

CHILD = Path(__file__).with_name("distributed_child.py")
TIMEOUT = 45


def launch(mode: str, tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    """Both ranks, from ``tmp_path`` (so ``./sonde.db`` is there); killed after TIMEOUT seconds."""
    return ranks.launch(CHILD, [mode, str(tmp_path)], tmp_path, TIMEOUT)[0]


def reference() -> dict[tuple[int, str, str], np.ndarray]:
    """One process, the global batch: each layer's tensors by (step, layer, topic), the loss by (step, '', 'loss')."""
    net = child.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    step = 0

    def hooks(name: str, module: nn.Module) -> None:
        def forward(mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[(step, name, "inputs")] = args[0].detach().double().numpy().copy()
            seen[(step, name, "activations")] = output.detach().double().numpy().copy()
            at = step
            output.register_hook(lambda g: seen.__setitem__((at, name, "output_grads"), g.double().numpy().copy()))

        module.register_forward_hook(forward)

    for name, module in net.named_children():
        hooks(name, module)
    for step in range(child.STEPS):
        x, y = child.global_batch(step)
        before = {n: p.detach().double().numpy().copy() for n, p in net.named_parameters()}
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.double().numpy().copy() for n, p in net.named_parameters()}
        opt.step()
        seen[(step, "", "loss")] = np.array(loss.item())
        keep_params(seen, step, net, before, grads)
    return seen


def keep_params(seen: dict[tuple[int, str, str], np.ndarray], step: int, net: nn.Module,
                before: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
    """Each parameter's value, gradient and update of ``step`` into ``seen`` (after the optimizer step)."""
    for n, p in net.named_parameters():
        layer, kind = n.split(".")
        topics = ("weights", "weight_grads", "weight_updates") if kind == "weight" else (
            "biases", "bias_grads", "bias_updates")
        for topic, value in zip(topics, (before[n], grads[n], p.detach().double().numpy() - before[n]), strict=True):
            seen[(step, layer, topic)] = value


def compare_run(df: Any, ref: dict[tuple[int, str, str], np.ndarray], label: str = "") -> int:
    """Check one stored run ``df`` (``sonde.load``) against the one-process ``ref``: each Record once
    (not once per rank), every step recorded, every statistic of every tensor equal. Returns how
    many values were compared."""
    keys = df[["step", "phase", "layer", "topic", "metric"]].astype(str).agg("|".join, axis=1)
    assert keys.is_unique, label  # written once, not once per rank (nor twice after a retry)
    train = df[df["phase"] == "train"]
    assert sorted(set(train["step"])) == list(range(child.STEPS)), label
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in train.itertuples()}
    compared = 0
    for (step, layer, topic), tensor in ref.items():
        if topic == "loss":
            assert values[(step, "", "loss", "loss")] == pytest.approx(float(tensor), rel=1e-6), label
            continue
        for metric, expected in numpy_stats(tensor).items():
            got = values[(step, layer, topic, metric)]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (label, step, layer, topic, metric)
            compared += 1
    return compared


def numpy_stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": x.mean(), "std": x.std(), "var": x.var(), "min": x.min(), "max": x.max(),
            "abs_mean": np.abs(x).mean(), "norm": np.sqrt((x * x).sum()), "zero_frac": (x == 0).mean()}


def test_ddp_two_ranks_record_one_run_equal_to_one_process_on_the_global_batch(tmp_path: Path) -> None:
    results = launch("ddp", tmp_path)
    assert not any("database is locked" in r.stderr for r in results)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["run"] == ranks[1]["run"]  # the name rank 0 chose, on both
    assert not any(r["switched_off"] for r in ranks)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == [
        "extra.db", "offloaded-device.db", "offloaded-host.db", "sonde.db"]
    df = sonde.load(tmp_path / "sonde.db")
    assert set(df["run"]) == {ranks[0]["run"]}  # one run
    ref = reference()
    compared = compare_run(df, ref)
    assert compared >= child.STEPS * 3 * 3 * 8  # three layers' inputs, activations, output_grads at least

    # Histograms: edges from the global batch's range at step 0; counts agree from step 1 on.
    arrays = sonde.load(tmp_path / "sonde.db", arrays=True)
    hist = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in arrays.itertuples()}
    assert not any(s == 0 and m == "histogram" for s, _, _, m in hist)  # binned over each rank's own range
    for layer in ("0", "1", "2"):
        first = ref[(0, layer, "activations")]
        edges = np.linspace(first.min(), first.max(), 65)
        for step in (1, 2):
            tensor = ref[(step, layer, "activations")].reshape(-1)
            expected = np.bincount(np.clip(((tensor - edges[0]) * 64 / (edges[-1] - edges[0])).astype(int), 0, 63),
                                   minlength=64)
            got = np.asarray(hist[(step, layer, "activations", "histogram")])
            assert got.sum() == tensor.size
            assert np.abs(got - expected).sum() <= 2, (layer, step)  # a value on a bin edge may fall either side
        got_edges = np.asarray(next(v for (s, la, t, m), v in hist.items()
                                    if la == layer and t == "activations" and m == "histogram_edges"))
        # float32 min and max: a rank's half batch and the reference's whole batch may differ in the
        # last bit (the matmul blocks by batch size), so the edges may differ by about one float32 step
        ulp = float(np.spacing(np.float32(np.abs(edges).max())))
        np.testing.assert_allclose(got_edges, edges, rtol=1e-6, atol=2 * ulp)

    # The second run: gathered rows are the global batch's, in order; a reset="never" mean covers
    # every global batch so far, each counted once.
    rows = sonde.load(tmp_path / "extra.db", arrays=True, metrics="rows")
    means = sonde.load(tmp_path / "extra.db", metrics="mean")
    for layer in ("0", "1", "2"):
        for step in range(child.STEPS):
            got = rows[(rows["step"] == step) & (rows["layer"] == layer)]["value"].iloc[0]
            np.testing.assert_allclose(got, ref[(step, layer, "activations")].reshape(-1), rtol=1e-6, atol=1e-7)
            so_far = np.concatenate([ref[(s, layer, "activations")].reshape(-1) for s in range(step + 1)])
            mean = means[(means["step"] == step) & (means["layer"] == layer)]["value"].iloc[0]
            assert mean == pytest.approx(so_far.mean(), rel=1e-6, abs=1e-8), (layer, step)

    # The offloaded metrics: each weight's σ₁ from rank 0's copy (rank 1's replica not counted),
    # and saturation of the global batch's activations (each rank's sums around its own shift).
    for path in ("host", "device"):
        db = tmp_path / f"offloaded-{path}.db"
        spectral = sonde.load(db, metrics="spectral_norm")
        assert sorted(zip(spectral["step"], spectral["layer"], strict=True)) == [
            (s, layer) for s in range(child.STEPS) for layer in ("0", "2")]  # the two Linear layers, every step
        for r in spectral.itertuples():
            weight = ref[(int(r.step), r.layer, "weights")]
            assert r.value == pytest.approx(np.linalg.svd(weight, compute_uv=False)[0], rel=1e-4), (r.step, r.layer)
        saturation = [*sonde.load(db, metrics="cov_trace").itertuples(),
                      *sonde.load(db, arrays=True, metrics="eigenvalues").itertuples()]
        assert len(saturation) == 2 * 3 * child.STEPS  # two metrics, three layers
        for r in saturation:
            rows = ref[(int(r.step), r.layer, "activations")]
            cov = np.cov(rows.reshape(rows.shape[0], -1), rowvar=False, bias=True)
            expected = np.trace(cov) if r.metric == "cov_trace" else np.linalg.eigvalsh(cov)[::-1][:3]
            np.testing.assert_allclose(r.value, expected, rtol=1e-6, atol=1e-9, err_msg=f"{path} {r}")


def test_a_failure_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """A store rank 0 cannot open fails on both ranks; a monitoring failure on rank 1 before a merge
    switches monitoring off on both, one after a merge only that part on rank 1; training finishes
    on both (bounded by the launcher's timeout)."""
    results = launch("fail", tmp_path)  # returns (no hang) or fails after TIMEOUT
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["switched_off"] for r in ranks)
    assert "not-a-dir" in ranks[0]["refused"] and "not-a-dir" in ranks[1]["refused"]  # rank 0's error, everywhere
    assert not (tmp_path / "fine1.db").exists()  # rank 1 never opened its own store
    assert "injected monitoring failure" in results[1].stderr
    assert "switched off on every rank" in results[0].stderr
    df = sonde.load(tmp_path / "sonde.db")
    assert sorted(set(df[df["phase"] == "train"]["step"])) == [0]  # step 0 merged; none after the failure
    # A failure after a merge (rank 1's step 1 emitting): that part is off on rank 1, which still
    # meets rank 0 at every later merge, so no rank waits and rank 0 records every step.
    assert "injected failure after the merge" in results[1].stderr
    assert not any(r["after_merge"]["switched_off"] for r in ranks)
    df = sonde.load(tmp_path / "after-merge.db")
    assert sorted(set(df[df["phase"] == "train"]["step"])) == list(range(child.STEPS))


def fsdp_reference() -> dict[tuple[int, str, str], np.ndarray]:
    """One process, the global batch, the unsharded network of the FSDP2 run: each layer's tensors by
    (step, layer, topic), the whole parameters' values, gradients and updates, the loss by (step, '', 'loss')."""
    net = child.make_fsdp_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    step = 0

    def forward(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[(step, name, "inputs")] = args[0].detach().double().numpy().copy()
            seen[(step, name, "activations")] = output.detach().double().numpy().copy()
            at = step
            output.register_hook(lambda g: seen.__setitem__((at, name, "output_grads"), g.double().numpy().copy()))
        return hook

    for name, module in net.named_children():
        module.register_forward_hook(forward(name))
    for step in range(child.STEPS):
        x, y = child.global_batch(step)
        before = {n: p.detach().double().numpy().copy() for n, p in net.named_parameters()}
        loss = child.fsdp_loss(net, x, y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.double().numpy().copy() for n, p in net.named_parameters()}
        opt.step()
        seen[(step, "", "loss")] = np.array(loss.item())
        keep_params(seen, step, net, before, grads)
    return seen


@pytest.mark.parametrize("mode", ["fsdp", "hsdp"])
def test_fsdp2_two_ranks_record_whole_parameters_from_their_shards(mode: str, tmp_path: Path) -> None:
    """FSDP2 (``fully_shard`` per Linear and on the root, CPU mesh): the statistics of each sharded
    parameter are those of the whole parameter (``fsdp``: shards of 4+3, 2+1 and 1+0 rows; ``hsdp``: two
    replicas of one whole shard, counted once), activations and output_grads those of the global batch,
    names the user's, and the graph is stored."""
    launch(mode, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["run"] == ranks[1]["run"]
    assert not any(r["switched_off"] for r in ranks)
    assert ranks[0]["graph_error"] == ""
    df = sonde.load(tmp_path / "sonde.db")
    ref = fsdp_reference()
    params = 3 * 2 * 3  # three Linear layers, weights and biases, value / gradient / update
    assert compare_run(df, ref) == child.STEPS * (5 * 3 + params) * 8
    train = df[df["phase"] == "train"]
    assert set(train["layer"]) - {""} == {"0", "1", "2", "3", "4"}  # no FSDP prefix
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in train.itertuples()}
    for (step, layer, topic), tensor in ref.items():
        if topic in ("weight_updates", "bias_updates"):
            weights = ref[(step, layer, "weights" if topic == "weight_updates" else "biases")]
            expected = np.sqrt((tensor * tensor).sum() / (weights * weights).sum())
            assert values[(step, layer, topic, "update_ratio")] == pytest.approx(expected, rel=1e-5), (step, layer)

    # Histograms of the whole parameters: edges from the first step's range over both shards, counts from
    # step 1 on (a rank's empty shard adds none).
    arrays = sonde.load(tmp_path / "sonde.db", arrays=True)
    hist = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in arrays.itertuples()}
    checked = 0
    for layer in ("0", "2", "4"):
        for topic in ("weights", "weight_grads", "weight_updates", "biases"):
            first = ref[(0, layer, topic)]
            if first.max() == first.min():
                continue
            edges = np.linspace(first.min(), first.max(), 65)
            got_edges = np.asarray(next(v for (s, la, t, m), v in hist.items()
                                        if la == layer and t == topic and m == "histogram_edges"))
            np.testing.assert_allclose(got_edges, edges, rtol=1e-6, atol=1e-9)
            for step in (1, 2):
                tensor = ref[(step, layer, topic)].reshape(-1)
                bins = np.clip(np.floor((tensor - edges[0]) * 64 / (edges[-1] - edges[0])), 0, 63).astype(int)
                got = np.asarray(hist[(step, layer, topic, "histogram")])
                assert got.sum() == tensor.size, (layer, topic, step)
                assert np.abs(got - np.bincount(bins, minlength=64)).sum() <= 2, (layer, topic, step)
                checked += 1
    assert checked >= 3 * 3 * 2

    with open_store(tmp_path / "sonde.db") as store:
        graph = store.get_graph(ranks[0]["run"])
    assert graph is not None
    modules = {n["name"]: n for n in graph["nodes"] if n["kind"] == "module"}
    assert sorted(modules) == ["0", "1", "2", "3", "4"]
    assert modules["4"]["op"] == "Linear" and modules["4"]["params"] == {"weight": [1, 3], "bias": [1]}
    assert modules["2"]["output_shapes"] == [[4, 3]]  # rank 0's batch share, whole-parameter shapes
    assert graph["num_params"] == sum(p.numel() for p in child.make_fsdp_net().parameters())


def test_fsdp2_without_an_optimizer_records_whole_gradients_and_the_users_class_names(tmp_path: Path) -> None:
    """Without ``optimizer=`` the gradients are read as backward accumulates them, which FSDP2 hands over
    as sharded ``DTensor`` gradients: their statistics are still those of the whole gradient. The run
    and its layers are named by the user's classes (``Sequential``, ``Linear``), not FSDP's."""
    launch("fsdp-no-optimizer", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert not any(r["switched_off"] for r in ranks)
    df = sonde.load(tmp_path / "sonde.db")
    train = df[df["phase"] == "train"]
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in train.itertuples()}
    ref = fsdp_reference()
    compared = 0
    for (step, layer, topic), tensor in ref.items():
        if topic not in ("weight_grads", "bias_grads", "activations"):
            continue
        for metric, expected in numpy_stats(tensor).items():
            assert values[(step, layer, topic, metric)] == pytest.approx(expected, rel=1e-5, abs=1e-7), (
                step, layer, topic, metric)
            compared += 1
    assert compared == child.STEPS * (3 * 2 + 5) * 8
    assert ranks[0]["run"].startswith("sequential")
    with open_store(tmp_path / "sonde.db") as store:
        layers = store.layers(ranks[0]["run"])
    types = dict(zip(layers["name"], layers["type"], strict=True))
    assert types["0"] == "Linear" and types["1"] == "Tanh"


def eval_reference() -> dict[tuple[int, str, str], np.ndarray]:
    """One unprobed process training on the global batches as the ``eval`` ranks do, evaluating the whole
    validation set after steps 1 and 2: each layer's inputs and activations by (the step the pass is filed
    under, layer, topic)."""
    net = child.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    at = 0

    def forward(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not mod.training:
                seen[(at, name, "inputs")] = args[0].detach().double().numpy().copy()
                seen[(at, name, "activations")] = output.detach().double().numpy().copy()
        return hook

    for name, module in net.named_children():
        module.register_forward_hook(forward(name))
    for step in range(child.STEPS):
        if step == 2:
            at = 2  # the weights after step 1's optimizer step
            child.evaluate(net, child.validation_set())
        x, y = child.global_batch(step)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    at = 3
    child.evaluate(net, child.validation_set())
    return seen


def test_ddp_evaluation_passes_record_the_whole_validation_set(tmp_path: Path) -> None:
    """Two DDP ranks evaluate 5 and 3 rows of an 8-row validation set (after the recorded step 1, and
    after the unrecorded step 2 as the probe closes): each pass's activation statistics are those of one
    process on the whole validation set, and the second pass's histogram counts those over the first
    pass's range."""
    launch("eval", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["run"] == ranks[1]["run"]
    assert not any(r["switched_off"] for r in ranks)
    df = sonde.load(tmp_path / "eval.db")
    keys = df[["step", "phase", "layer", "topic", "metric"]].astype(str).agg("|".join, axis=1)
    assert keys.is_unique
    evals = df[df["phase"] == "eval"]
    assert sorted(set(evals["step"])) == [2, 3]
    assert not set(evals["topic"]) & {"weights", "biases", "weight_grads", "bias_grads", "weight_updates",
                                      "bias_updates"}  # parameter topics are not recorded in eval
    assert sorted(set(df[df["phase"] == "train"]["step"])) == [0, 1]  # step 2 is not recorded
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in evals.itertuples()}
    ref = eval_reference()
    assert len(ref) == 2 * 3 * 2  # two passes, three layers, inputs and activations
    for (step, layer, topic), tensor in ref.items():
        assert tensor.shape[0] == sum(child.VAL_ROWS)
        for metric, expected in numpy_stats(tensor).items():
            got = values[(step, layer, topic, metric)]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (step, layer, topic, metric)

    # Histograms: the edges are fixed from the first pass's whole-set range (its counts, binned over each
    # rank's own range, are dropped); the second pass's counts are those of the whole set over them.
    arrays = sonde.load(tmp_path / "eval.db", arrays=True)
    hist = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in arrays.itertuples() if r.phase == "eval"}
    assert not any(s == 2 and m == "histogram" for s, _, _, m in hist)
    for layer in ("0", "1", "2"):
        first = ref[(2, layer, "activations")]
        edges = np.linspace(first.min(), first.max(), 65)
        np.testing.assert_allclose(np.asarray(hist[(3, layer, "activations", "histogram_edges")]), edges,
                                   rtol=1e-6, atol=1e-7)
        tensor = ref[(3, layer, "activations")].reshape(-1)
        bins = np.clip(np.floor((tensor - edges[0]) * 64 / (edges[-1] - edges[0])), 0, 63).astype(int)
        got = np.asarray(hist[(3, layer, "activations", "histogram")])
        assert got.sum() == tensor.size, layer
        assert np.abs(got - np.bincount(bins, minlength=64)).sum() <= 2, layer  # a value on an edge: either side
