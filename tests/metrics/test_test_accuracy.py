"""test_accuracy and test_loss over a user's loader: weighted by samples, at the scheduled steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.metrics import TestAccuracy


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(103, 5, generator=g)
    return x, (x[:, 0] * 2 + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()


def direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over the whole set at once, in eval mode."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(1) == y).double().mean()), float(nn.functional.cross_entropy(out.double(), y))


def test_values_are_weighted_by_samples_not_a_mean_of_batch_means() -> None:
    model = make_model()
    x, y = held_out()
    loader = DataLoader(TensorDataset(x, y), batch_size=50)  # batches of 50, 50 and 3
    model.eval()
    with torch.no_grad():
        got = TestAccuracy(loader, loss_fn=nn.functional.cross_entropy).evaluate(model)
        per_element = TestAccuracy(loader, loss_fn=lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"))
        got_none = per_element.evaluate(model)
        batch_means = np.mean([float((model(bx).argmax(1) == by).double().mean()) for bx, by in loader])
    accuracy, loss = direct(model, x, y)
    assert got["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert got["test_loss"] == pytest.approx(loss, rel=1e-6)
    assert got_none["test_loss"] == pytest.approx(loss, rel=1e-6)
    assert abs(batch_means - accuracy) > 1e-3  # the test would catch Ikkuna's mean of batch means


def test_padding_labels_are_left_out() -> None:
    model = make_model()
    x, y = held_out()
    y_padded = y.clone()
    y_padded[::4] = -100
    model.eval()
    with torch.no_grad():
        got = TestAccuracy([(x[:60], y_padded[:60]), (x[60:], y_padded[60:])],
                           loss_fn=nn.functional.cross_entropy).evaluate(model)
        out = model(x)
    keep = y_padded >= 0
    assert got["test_accuracy"] == pytest.approx(float((out.argmax(1) == y)[keep].double().mean()), abs=1e-12)
    assert got["test_loss"] == pytest.approx(float(nn.functional.cross_entropy(out[keep].double(), y[keep])), rel=1e-6)


def test_through_the_probe_at_every_n_steps_with_the_weights_of_that_step() -> None:
    model = make_model()
    x, y = held_out()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    collect = Collect()
    expected: dict[int, tuple[float, float]] = {}
    twin = make_model()
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect],
                     metrics=["loss", TestAccuracy(loader, every=3, loss_fn=nn.functional.cross_entropy)]) as p:
        for step in range(7):
            twin.load_state_dict(model.state_dict())
            expected[step] = direct(twin, x, y)
            bx = torch.randn(16, 5)
            loss = nn.functional.cross_entropy(model(bx), (bx[:, 0] > 0).long())
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
            assert model.training
    records = collect.find(metric="test_accuracy")
    assert [r.step for r in records] == [0, 3, 6]
    assert all(r.phase == "eval" and r.layer == "" and r.topic == "outputs" for r in records)
    for r in records:
        assert r.value == pytest.approx(expected[r.step][0], abs=1e-12)
        assert collect.value(metric="test_loss", step=r.step) == pytest.approx(expected[r.step][1], rel=1e-6)
    assert expected[6] != expected[0]


def test_by_name_or_with_bad_arguments_it_explains_itself() -> None:
    with pytest.raises(ConfigError, match="TestAccuracy\\(test_loader"):
        sonde.probe(make_model(), store=None, metrics=["test_accuracy"])
    with pytest.raises(ConfigError, match="iterable"):
        TestAccuracy(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pairs"):
        model = make_model()
        model.eval()
        TestAccuracy([torch.randn(3, 5)]).evaluate(model)


def test_a_failing_loader_does_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> object:
        raise OSError("disk gone")
        yield

    class Loader:
        def __iter__(self) -> object:
            return broken()

    model = make_model()
    collect = Collect()
    with sonde.probe(model, store=None, sinks=[collect], metrics=["mean", TestAccuracy(Loader(), every=1)]):
        for _ in range(2):
            model(torch.randn(8, 5)).sum().backward()
    assert collect.find(metric="mean") and not collect.find(metric="test_accuracy")
    assert "disk gone" in caplog.text
    assert model.training
