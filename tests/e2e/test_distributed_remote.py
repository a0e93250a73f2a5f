"""Distributed runs recorded elsewhere than in a local SQLite file, and through a trainer.

- A real ``sonde serve`` on PostgreSQL receives two DDP runs of two ranks each, launched at once (four
  processes writing at the same time, rank 0 of each shipping with ``server=``): two runs, every
  step's Records once, the values of one process on the global batch.
- The Hugging Face ``Trainer`` on two CPU processes (gloo) with ``sonde.transformers.SondeCallback``:
  one run, each Record once, a layer's activation statistics those of one process on the
  concatenated batches.

Expected values are computed here, independently of sonde: plain torch hooks and numpy
(:func:`test_distributed.reference`, and a copy of the Trainer's model loaded with the weights of
each step).
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import distributed_child as child
import numpy as np
import pytest
import ranks
import torch
from ranks import ranks_env, run_all
from test_distributed import compare_run, numpy_stats, reference
from torch import nn

from collect import stored
from servers import SondeServe, free_port
from sonde.store import open_store
from stores import postgres_schema_url

REMOTE_CHILD = Path(__file__).with_name("remote_ddp_child.py")
HF_CHILD = Path(__file__).with_name("hf_ddp_child.py")
HF_LAYERS = ("bert.encoder.layer.0.output.dense", "classifier")
TIMEOUT = 180  # the whole launch of all ranks; a hang fails the test


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[tuple[SondeServe, str]]:
    """``sonde serve --store <PostgreSQL URL on a fresh schema>`` (skips without SONDE_TEST_POSTGRES_URL)."""
    urls = postgres_schema_url()
    url = next(urls)
    try:
        # SondeServe passes ``str(store)`` to ``--store``: the URL as it is (a Path would fold its ``//``)
        with SondeServe.running(cast(Path, url), tmp_path / "serve.log") as server:
            yield server, url
    finally:
        urls.close()


def test_two_distributed_runs_ship_at_once_to_a_postgresql_server(pg_server: tuple[SondeServe, str],
                                                                  tmp_path: Path) -> None:
    server, url = pg_server
    commands = []
    for run in ("alpha", "beta"):
        out = tmp_path / run
        out.mkdir()
        for env in ranks_env(free_port()):
            commands.append(([sys.executable, str(REMOTE_CHILD), str(out), server.url, run], out, env))
    run_all(commands, TIMEOUT)  # two process groups of two ranks, all four at once

    for run in ("alpha", "beta"):
        ranks = [json.loads((tmp_path / run / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["run"] for r in ranks] == [run, run]
        assert not any(r["switched_off"] for r in ranks)
        assert not list((tmp_path / run).glob("*.db"))  # no rank wrote a local store

    ref = reference()
    with open_store(url) as store:
        assert sorted(store.runs()["name"]) == ["alpha", "beta"]
        for run in ("alpha", "beta"):
            df = store.load(run)
            assert compare_run(df, ref, run) >= child.STEPS * 3 * 3 * 8
            emitted = pickle.loads((tmp_path / run / "emitted.pkl").read_bytes())
            assert len(emitted) > len(df)  # the scalar Records and the histograms
            assert sorted(stored(store, run)) == sorted(emitted)  # all rank 0 emitted, nothing more


def hf_reference(out: Path) -> dict[tuple[int, str, str], np.ndarray]:
    """One process, an unprobed copy of the Trainer's model loaded with the weights each step started
    from, run on the concatenation of the ranks' batches of that step: the tensors of HF_LAYERS by
    (step, layer, topic), the loss by (step, '', 'loss')."""
    import hf_ddp_child as hf

    batches = [torch.load(out / f"batches{rank}.pt") for rank in range(2)]
    weights = torch.load(out / "weights.pt")
    model = hf.make_model()
    modules = dict(model.named_modules())
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    step = 0

    def forward(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[(step, name, "activations")] = output.detach().double().numpy().copy()
            at = step
            output.register_hook(lambda g: seen.__setitem__((at, name, "output_grads"), g.double().numpy().copy()))
        return hook

    for name in HF_LAYERS:
        modules[name].register_forward_hook(forward(name))
    assert len(weights) == len(batches[0]) == len(batches[1])
    for step, state in enumerate(weights):
        model.load_state_dict(state)
        model.train()  # as the Trainer runs it (the config has no dropout)
        model.zero_grad()
        ids = torch.cat([batches[0][step]["input_ids"], batches[1][step]["input_ids"]])
        labels = torch.cat([batches[0][step]["labels"], batches[1][step]["labels"]])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        seen[(step, "", "loss")] = np.array(loss.item())
        seen[(step, "classifier", "weight_grads")] = modules["classifier"].weight.grad.double().numpy().copy()
    return seen


def test_hugging_face_trainer_on_two_processes_records_once_the_global_batch(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    import hf_ddp_child as hf

    ranks.launch(HF_CHILD, [str(tmp_path)], tmp_path, TIMEOUT)
    trained = json.loads((tmp_path / "rank0.json").read_text())
    assert trained == {"steps": hf.EXAMPLES // (2 * hf.PER_DEVICE), "world": 2}  # a DDP run of 2 ranks
    assert not (tmp_path / "sonde.db").exists()

    with open_store(tmp_path / "hf.db") as store:
        assert len(store.runs()) == 1
        df = store.load(store.runs()["name"].iloc[0])
    keys = df[["step", "phase", "layer", "topic", "metric"]].astype(str).agg("|".join, axis=1)
    assert keys.is_unique  # written once, by rank 0
    train = df[df["phase"] == "train"]
    assert sorted(set(train["step"])) == list(range(trained["steps"]))
    assert not any(layer.startswith("module.") for layer in train["layer"])
    values = {(int(r.step), r.layer, r.topic, r.metric): r.value for r in train.itertuples()}

    ref = hf_reference(tmp_path)
    compared = 0
    for (step, layer, topic), tensor in ref.items():
        if topic == "loss":  # the mean of the ranks' mean losses: the global batch's for equal shares
            assert values[(step, "", "loss", "loss")] == pytest.approx(float(tensor), rel=1e-5)
            continue
        stats = numpy_stats(tensor)
        for metric in ("mean", "std", "min", "max", "norm"):
            got = values[(step, layer, topic, metric)]
            assert got == pytest.approx(stats[metric], rel=1e-4, abs=1e-7), (step, layer, topic, metric)
            compared += 1
    assert compared == trained["steps"] * (2 * len(HF_LAYERS) + 1) * 5
