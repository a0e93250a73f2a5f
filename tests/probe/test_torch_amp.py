"""Mixed precision: gradients reported unscaled under any GradScaler, skipped steps recorded as
such, autocast activations summarised in float32, fused and foreach optimizers recorded alike.

Every expected value is computed in the test from an unprobed, unscaled run of a copy of the model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect

METRICS = ["mean", "std", "max", "norm"]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def summary(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().double().numpy()
    return {"mean": x.mean(), "std": x.std(), "max": x.max(), "norm": np.linalg.norm(x.ravel())}


def reference(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], opt_kwargs: dict[str, object]
              ) -> list[dict[tuple[str, str], dict[str, float]]]:
    """Per step: each layer's output gradient, weight gradient and weight update, from a plain
    (unscaled, unprobed) run with the test's own tensor hooks."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **opt_kwargs)  # type: ignore[arg-type]
    steps = []
    for x, y in data:
        found: dict[tuple[str, str], dict[str, float]] = {}
        outs = {}
        h = x
        for i, layer in enumerate(model):
            h = layer(h)
            outs[str(i)] = h
            h.register_hook(lambda g, i=i, into=found: into.__setitem__((str(i), "output_grads"), summary(g)))
        nn.functional.cross_entropy(h, y).backward()
        before = {str(i): model[i].weight.detach().clone() for i in (0, 2)}
        for i in (0, 2):
            found[(str(i), "weight_grads")] = summary(model[i].weight.grad)
        opt.step()
        opt.zero_grad()
        for i in (0, 2):
            found[(str(i), "weight_updates")] = summary(model[i].weight.detach() - before[str(i)])
        steps.append(found)
    return steps


def check(collect: Collect, expected: list[dict[tuple[str, str], dict[str, float]]], rtol: float = 1e-5) -> None:
    for step, found in enumerate(expected):
        for (layer, topic), values in found.items():
            for metric, value in values.items():
                got = collect.value(step=step, layer=layer, topic=topic, metric=metric)
                assert got == pytest.approx(value, rel=rtol, abs=1e-7), (step, layer, topic, metric)


def test_gradients_are_reported_unscaled_under_a_grad_scaler(collect: Collect) -> None:
    model, data = mlp(), batches(3)
    expected = reference(copy.deepcopy(model), data, {})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # the scale changes every step
    with sonde.probe(model, store=None, optimizer=opt, metrics=METRICS, sinks=[collect],
                     topics=["output_grads", "weight_grads", "weight_updates"]):
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert scaler.get_scale() == 1024.0 * 2**3  # the scale did change between steps
    check(collect, expected)


def test_gradients_without_optimizer_argument_are_unscaled_too(collect: Collect) -> None:
    model, data = mlp(), batches(1)
    expected = reference(copy.deepcopy(model), data, {})[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with sonde.probe(model, store=None, metrics=METRICS, sinks=[collect], topics=["output_grads", "weight_grads"]):
        x, y = data[0]
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    for key in [k for k in expected if k[1] != "weight_updates"]:
        for metric, value in expected[key].items():
            got = collect.value(step=0, layer=key[0], topic=key[1], metric=metric)
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_a_step_the_scaler_skips_is_recorded_as_skipped(collect: Collect, caplog: pytest.LogCaptureFixture) -> None:
    model, data = mlp(), batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    metrics = [*METRICS, "update_ratio", sonde.metrics.Alerts(warmup=0, update_ratio=(1e-9, 1.0))]
    with sonde.probe(model, store=None, optimizer=opt, metrics=metrics, sinks=[collect],
                     topics=["activations", "weights", "weight_updates"]):
        for step, (x, y) in enumerate(data):
            before = model[0].weight.detach().clone()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 1:
                loss = loss * float("inf")  # inf gradients: the scaler skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            changed = not torch.equal(before, model[0].weight)
            assert changed == (step != 1)
    assert scaler.get_scale() == 128.0
    skipped = [r for r in collect.find(metric="alert") if "skipped" in r.message]
    assert [(r.step, r.layer, r.topic) for r in skipped] == [(1, "", "weight_updates")]
    assert "inf/NaN" in skipped[0].message and "256" in skipped[0].message
    # updates of exactly zero at the skipped step, real ones around it; three steps, not two
    assert collect.value(step=1, layer="0", topic="weight_updates", metric="norm") == 0.0
    assert collect.value(step=0, layer="0", topic="weight_updates", metric="norm") > 0
    assert collect.value(step=2, layer="0", topic="weight_updates", metric="norm") > 0
    assert sorted({r.step for r in collect.find(layer="0", topic="activations", metric="mean")}) == [0, 1, 2]
    # the zero updates are not taken for stalled learning
    assert not [r for r in collect.find(metric="alert") if "update ratio" in r.message]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_activations_are_summarised_in_float32(collect: Collect, dtype: torch.dtype) -> None:
    model, (x, y) = mlp(), batches(1)[0]
    x = x * 50  # large activations: float16/bfloat16 sums would be visibly off
    with torch.autocast("cpu", dtype=dtype):
        reference_out = model[0](x)
    assert reference_out.dtype == dtype
    expected = summary(reference_out.float())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, metrics=["mean", "std", "max", "norm"], sinks=[collect],
                     layers=["0"], topics=["activations"]):
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    for metric in ("mean", "std", "max", "norm"):
        got = collect.value(step=0, layer="0", topic="activations", metric=metric)
        assert got == pytest.approx(expected[metric], rel=1e-5), metric
    # a summary rounded to the activations' own dtype would be off by more than that tolerance
    for metric in ("std", "norm"):
        rounded = float(torch.tensor(expected[metric]).to(dtype))
        assert rounded != pytest.approx(expected[metric], rel=1e-5)


@pytest.mark.parametrize("variant", [{"foreach": True}, {"fused": True}])
def test_fused_and_foreach_optimizers_give_the_plain_optimizers_values(collect: Collect,
                                                                     variant: dict[str, bool]) -> None:
    model, data = mlp(), batches(3)
    expected = reference(copy.deepcopy(model), data, {"foreach": False})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **variant)  # type: ignore[arg-type]
    with sonde.probe(model, store=None, optimizer=opt, metrics=METRICS, sinks=[collect],
                     topics=["output_grads", "weight_grads", "weight_updates"]):
        for x, y in data:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    check(collect, expected, rtol=1e-4)


def test_the_scaler_lightning_creates_is_seen_without_an_argument(collect: Collect) -> None:
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from sonde.lightning import SondeCallback

    class Module(lightning.LightningModule):  # type: ignore[misc]
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    net, (x, y) = mlp(), batches(1)[0]
    # the unscaled reference: the same fp16 autocast forward, a plain backward
    twin = copy.deepcopy(net)
    grads: dict[str, torch.Tensor] = {}
    with torch.autocast("cpu", dtype=torch.float16):
        h = x
        for i, layer in enumerate(twin):
            h = layer(h)
            h.register_hook(lambda g, i=i, into=grads: into.__setitem__(str(i), g.float()))
        loss = nn.functional.cross_entropy(h, y)
    loss.backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                        callbacks=[SondeCallback(store=None, sinks=[collect], metrics=["norm"],
                                                 topics=["output_grads", "weight_grads"])])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    trainer.fit(Module(net), loader)
    for i in ("0", "1", "2"):
        expected = float(grads[i].double().norm())
        got = collect.value(step=0, layer=f"net.{i}", topic="output_grads", metric="norm")
        assert got == pytest.approx(expected, rel=1e-3), i
    expected = float(twin[0].weight.grad.double().norm())
    got = collect.value(step=0, layer="net.0", topic="weight_grads", metric="norm")
    assert got == pytest.approx(expected, rel=1e-3)
