"""``sonde.lightning.SondeCallback`` on a real Lightning ``Trainer``: optimizer steps under gradient
accumulation, gradients captured inside ``optimizer.step(closure)``, layer names that stay plain
when ``training_step`` never calls the module's own forward, the unscaled loss, accuracy from the
module's forward, validation as its own phase, and a failed fit closed as failed. Every number is
checked against the same training replayed by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from collect import Collect
from sonde.store import open_store

L = pytest.importorskip("lightning")

from sonde.lightning import SondeCallback  # noqa: E402

LR = 0.1


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


class Classifier(L.LightningModule):  # type: ignore[misc]
    """``training_step`` calls ``self.net`` (not ``self``), or with ``via_forward`` the module's forward."""

    def __init__(self, net: nn.Module, via_forward: bool = False, fail_at: int | None = None) -> None:
        super().__init__()
        self.net, self.via_forward, self.fail_at = net, via_forward, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("diverged")
        x, y = batch
        out = self(x) if self.via_forward else self.net(x)
        return nn.functional.cross_entropy(out, y)

    def validation_step(self, batch: Any, i: int) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self.net(x)
        return {"loss": nn.functional.cross_entropy(out, y), "outputs": out}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def _data() -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _fit(module: Classifier, callback: SondeCallback, val: bool = False, **kw: Any) -> Any:
    trainer = L.Trainer(accelerator="cpu", callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)
    trainer.fit(module, _data(), _data() if val else None)
    return trainer


def test_steps_gradients_updates_and_loss_match_the_training_replayed_by_hand(collect: Collect) -> None:
    net = _net()
    replay = _net()
    replay.load_state_dict(net.state_dict())
    callback = SondeCallback(store=None, sinks=[collect], metrics=["loss", "norm"])
    _fit(Classifier(net), callback, val=True, max_epochs=2, accumulate_grad_batches=2)
    assert callback.probe is None

    # by hand: two batches of 16 per step, each loss halved, the gradients summed, one SGD step
    expected: dict[str, list[float]] = {"loss": [], "weight_grads": [], "weight_updates": [], "weights": []}
    batches = list(_data())
    for _epoch in range(2):
        for first in (0, 2):
            replay.zero_grad()
            losses = []
            for x, y in batches[first:first + 2]:
                loss = nn.functional.cross_entropy(replay(x), y)
                (loss / 2).backward()
                losses.append(float(loss.detach()))
            weight, grad = replay[0].weight.detach().numpy().copy(), replay[0].weight.grad.numpy().copy()
            expected["loss"].append(float(np.mean(losses)))
            expected["weights"].append(float(np.linalg.norm(weight)))
            expected["weight_grads"].append(float(np.linalg.norm(grad)))
            expected["weight_updates"].append(float(np.linalg.norm(-LR * grad)))
            with torch.no_grad():
                for param in replay.parameters():
                    param -= LR * param.grad
    train = [r for r in collect.records if r.phase == "train"]
    assert sorted({r.step for r in train}) == [0, 1, 2, 3]
    got = [collect.value(step=k, phase="train", metric="loss") for k in range(4)]
    np.testing.assert_allclose(got, expected["loss"], rtol=1e-5)
    for topic in ("weights", "weight_grads", "weight_updates"):
        got = [collect.value(step=k, layer="net.0", topic=topic, metric="norm") for k in range(4)]
        np.testing.assert_allclose(got, expected[topic], rtol=1e-5, err_msg=topic)
    # training_step called self.net, never the module's forward: names stay plain all the same
    assert {r.layer for r in train} == {"", "net.0", "net.1", "net.2"}
    # validation after each epoch, filed at the step whose weights it used
    assert sorted({r.step for r in collect.records if r.phase == "eval"}) == [2, 4]
    assert {r.layer for r in collect.records if r.phase == "eval"} == {"", "net.0", "net.1", "net.2"}


def test_accuracy_comes_from_the_modules_forward(collect: Collect) -> None:
    net = _net()
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    net.register_forward_hook(lambda m, a, out: outputs.append(out.detach().numpy().copy()) if m.training else None)
    callback = SondeCallback(store=None, sinks=[collect], metrics=["train_accuracy"])
    _fit(Classifier(net, via_forward=True), callback, max_epochs=1)
    labels = [y.numpy() for _, y in _data()]
    for k, (out, y) in enumerate(zip(outputs, labels, strict=True)):
        assert collect.value(step=k, metric="train_accuracy") == pytest.approx(float((out.argmax(1) == y).mean()))


def test_a_fit_that_raises_closes_the_run_as_failed_keeping_its_steps(tmp_path: Path) -> None:
    callback = SondeCallback(run="diverges", store=tmp_path / "s.db", metrics=["loss"])
    with pytest.raises(RuntimeError, match="diverged"):
        _fit(Classifier(_net(), fail_at=2), callback, max_epochs=1)
    assert callback.probe is None
    with open_store(tmp_path / "s.db") as store:
        assert store.runs().set_index("name").loc["diverges", "status"] == "failed"
        assert sorted(store.load("diverges")["step"].unique()) == [0, 1]
