"""``loss``, ``train_accuracy`` and ``update_ratio`` through a probe, against numpy in the test.

* loss: the logged values of a step, averaged.
* train_accuracy: correct / counted over every batch logged in the step (not a mean of batch
  means); argmax of (B, C) outputs, ``> 0`` for binary (B,) logits; labels < 0 are ignored.
* update_ratio: ``‖w_after − w_before‖₂ / ‖w_before‖₂`` around ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.functional import accuracy_counts
from sonde.records import Record


def values(records: list[Record], metric: str, phase: str = "train") -> dict[tuple[int, str, str], float]:
    out = {}
    for r in records:
        if r.metric == metric and r.phase == phase:
            key = (r.step, r.layer, r.topic)
            assert key not in out
            out[key] = r.value
    return out


def numpy_accuracy(outputs: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    labels = labels.reshape(-1)
    pred = (outputs.reshape(-1) > 0).astype(np.int64) if outputs.ndim == 1 else outputs.argmax(axis=-1).reshape(-1)
    keep = labels >= 0
    return int(np.count_nonzero((pred == labels) & keep)), int(np.count_nonzero(keep))


# -- loss ----------------------------------------------------------------------------------------


def test_loss_logs_of_a_step_are_averaged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    logged: list[list[float]] = []
    sink = Collect()
    with sonde.probe(model, store=None, optimizer=opt, sinks=[sink], metrics=["loss"]) as p:
        for micro_batches in (1, 3, 2):
            opt.zero_grad()
            step_losses = []
            for _ in range(micro_batches):  # gradient accumulation: several logs, one step
                x = torch.randn(8, 4, generator=gen)
                y = torch.randint(0, 3, (8,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                p.log(loss=loss)
                step_losses.append(float(loss.item()))
            logged.append(step_losses)
            opt.step()
        p.log(loss=0.25)  # a plain number joins the last step
        logged[-1].append(0.25)
    got = values(sink.records, "loss")
    assert set(got) == {(0, "", "loss"), (1, "", "loss"), (2, "", "loss")}
    for step, step_losses in enumerate(logged):
        assert got[(step, "", "loss")] == pytest.approx(np.mean(np.array(step_losses, dtype=np.float64)), rel=1e-12)


def test_non_scalar_loss_is_reduced_by_mean() -> None:
    model = nn.Sequential(nn.Identity())
    sink = Collect()
    per_sample = torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64)
    with sonde.probe(model, store=None, sinks=[sink], metrics=["loss"]) as p:
        model(torch.zeros(1))
        p.log(loss=per_sample)
        p.log(loss=torch.tensor(3.0))
    assert values(sink.records, "loss")[(0, "", "loss")] == pytest.approx((2.0 + 3.0) / 2, rel=1e-15)


# -- train_accuracy --------------------------------------------------------------------------------


def _accuracy_run(batches_per_step: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[int, float]:
    """Log the given (outputs, labels) batches, one list per step; return train_accuracy per step."""
    model = nn.Sequential(nn.Identity())
    sink = Collect()
    with sonde.probe(model, store=None, sinks=[sink], metrics=["train_accuracy"]) as p:
        for batches in batches_per_step:
            model(torch.zeros(1))  # a train forward starts each step (no optimizer given)
            for outputs, labels in batches:
                p.log(outputs=outputs, labels=labels)
    return {
        step: v
        for (step, layer, topic), v in values(sink.records, "train_accuracy").items()
        if (layer, topic) == ("", "outputs")
    }


def _expected(batches_per_step: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[int, float]:
    out = {}
    for step, batches in enumerate(batches_per_step):
        counts = np.array([numpy_accuracy(o.numpy(), lab.numpy()) for o, lab in batches])
        if counts[:, 1].sum():
            out[step] = counts[:, 0].sum() / counts[:, 1].sum()
    return out


def test_train_accuracy_multiclass_over_all_batches_of_the_step() -> None:
    gen = torch.Generator().manual_seed(2)

    def batch(n: int, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, classes, generator=gen), torch.randint(0, classes, (n,), generator=gen)

    steps = [[batch(16)], [batch(3), batch(29)], [batch(7), batch(1), batch(40)]]
    got = _accuracy_run(steps)
    want = _expected(steps)
    assert sorted(got) == [0, 1, 2]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-12)
    # Weighted by samples, not the mean of batch means (they differ for these batches).
    batch_means = [np.mean([a / b for a, b in (numpy_accuracy(o.numpy(), lab.numpy()) for o, lab in s)]) for s in steps]
    assert got[1] != pytest.approx(batch_means[1]) or got[2] != pytest.approx(batch_means[2])


def test_train_accuracy_binary_logits_and_ignored_labels() -> None:
    gen = torch.Generator().manual_seed(3)
    binary = torch.randn(50, generator=gen)
    binary_labels = torch.randint(0, 2, (50,), generator=gen)
    column = torch.randn(20, 1, generator=gen)
    column_labels = torch.randint(0, 2, (20,), generator=gen)
    padded = torch.randn(30, 4, generator=gen)
    padded_labels = torch.randint(0, 4, (30,), generator=gen)
    padded_labels[::3] = -100
    sequence = torch.randn(4, 6, 3, generator=gen)
    sequence_labels = torch.randint(-1, 3, (4, 6), generator=gen)
    steps = [
        [(binary, binary_labels)],
        [(column[:, 0], column_labels)],
        [(padded, padded_labels)],
        [(sequence.reshape(24, 3), sequence_labels.reshape(24))],
        [(padded[:5], torch.full((5,), -100))],  # nothing counted: no record
    ]
    got = _accuracy_run(steps)
    want = _expected(steps)
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-12)
    # (B, 1) logits and (B, T, C) outputs as logged directly are scored the same way.
    np.testing.assert_array_equal(
        accuracy_counts(column, column_labels).numpy(), numpy_accuracy(column[:, 0].numpy(), column_labels.numpy())
    )
    np.testing.assert_array_equal(
        accuracy_counts(sequence, sequence_labels).numpy(),
        numpy_accuracy(sequence.reshape(24, 3).numpy(), sequence_labels.reshape(24).numpy()),
    )


def test_train_accuracy_through_training_loop() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(5)
    expected = []
    sink = Collect()
    with sonde.probe(model, store=None, optimizer=opt, sinks=[sink], metrics=["train_accuracy", "loss"]) as p:
        for _ in range(3):
            x = torch.randn(64, 6, generator=gen)
            y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            p.log(loss=loss, labels=y, outputs=out)  # after the step: still this step's values
            correct, total = numpy_accuracy(out.detach().numpy(), y.numpy())
            expected.append((correct / total, float(loss.item())))
    accuracy = values(sink.records, "train_accuracy")
    losses = values(sink.records, "loss")
    for step, (acc, loss_value) in enumerate(expected):
        assert accuracy[(step, "", "outputs")] == pytest.approx(acc, rel=1e-12)
        assert losses[(step, "", "loss")] == pytest.approx(loss_value, rel=1e-12)


# -- update_ratio --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=1e-3),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_update_ratio_matches_numpy_around_optimizer_step(
    make_optimizer: Callable[[object], torch.optim.Optimizer],
) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(7)
    expected: dict[tuple[int, str, str], float] = {}
    sink = Collect()
    with sonde.probe(model, store=None, optimizer=opt, sinks=[sink], metrics=["update_ratio"]):
        for step in range(4):
            x = torch.randn(10, 5, generator=gen)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            before = {name: p.detach().double().numpy().copy() for name, p in model.named_parameters()}
            opt.step()
            for name, param in model.named_parameters():
                layer, kind = name.split(".")
                after = param.detach().double().numpy()
                ratio = np.linalg.norm(after - before[name]) / np.linalg.norm(before[name])
                expected[(step, layer, "weight_updates" if kind == "weight" else "bias_updates")] = ratio
    got = values(sink.records, "update_ratio")
    assert set(got) == set(expected)
    for key, ratio in expected.items():
        assert ratio > 0
        assert got[key] == pytest.approx(ratio, rel=1e-5), key
    # The required norm was pulled in and recorded for the parameters and their updates.
    norms = values(sink.records, "norm")
    assert (0, "0", "weights") in norms and (0, "0", "weight_updates") in norms


def test_update_ratio_of_zero_weights_is_nan() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 2))
    nn.init.zeros_(model[0].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Collect()
    with sonde.probe(model, store=None, optimizer=opt, sinks=[sink], metrics=["update_ratio"]):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
    got = values(sink.records, "update_ratio")
    assert np.isnan(got[(0, "0", "bias_updates")])
    assert np.isfinite(got[(0, "0", "weight_updates")]) and got[(0, "0", "weight_updates")] > 0


def test_update_ratio_with_only_update_topics_selected() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Collect()
    with sonde.probe(
        model, store=None, optimizer=opt, sinks=[sink], metrics=["update_ratio"], topics=["weight_updates"]
    ):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
    assert (0, "0", "weight_updates") in values(sink.records, "update_ratio")
