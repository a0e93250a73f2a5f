"""The reference PyTorch adapter: topics, steps, phases, layer names and selection, hook hygiene."""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError, LayerFilterError, ProbeError, StoreError
from sonde.topics import TENSOR_TOPICS


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))


def train(model: nn.Module, probe: sonde.Probe, opt: torch.optim.Optimizer | None, steps: int) -> None:
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        probe.log(loss=loss, labels=y, outputs=out)


def test_every_topic_of_every_layer_is_recorded_at_every_step(collect: Collect) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect]) as p:
        train(model, p, opt, 3)
    topics = {(r.layer, r.topic) for r in collect.records}
    for layer in ("0", "2"):
        for topic in TENSOR_TOPICS:
            assert (layer, topic) in topics, (layer, topic)
    assert {("1", t) for t in ("inputs", "activations", "output_grads")} <= topics
    assert ("", "loss") in topics and ("", "outputs") in topics
    assert sorted({r.step for r in collect.records}) == [0, 1, 2]
    assert {r.phase for r in collect.records} == {"train"}
    assert len(collect.find(layer="", metric="train_accuracy")) == 3


def test_every_n_records_only_multiples_of_n(collect: Collect) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, every=3, sinks=[collect]) as p:
        train(model, p, opt, 7)
    assert sorted({r.step for r in collect.records}) == [0, 3, 6]


def test_per_metric_schedule_overrides_the_probe_schedule(collect: Collect) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = [sonde.metrics.Mean(), sonde.metrics.Histogram(every=2)]
    with sonde.probe(model, store=None, optimizer=opt, metrics=metrics, sinks=[collect]) as p:
        train(model, p, opt, 4)
    assert sorted({r.step for r in collect.find(metric="mean")}) == [0, 1, 2, 3]
    assert sorted({r.step for r in collect.find(metric="histogram")}) == [0, 2]


def test_eval_pass_under_no_grad_is_its_own_phase_at_the_step_whose_weights_it_used(collect: Collect) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect]) as p:
        train(model, p, opt, 2)
        model.eval()
        x = torch.randn(10, 4)
        with torch.no_grad():
            model(x[:5])
            model(x[5:])  # two eval batches merge into one value
        expected = model[0](x).detach().numpy()
        model.train()
        train(model, p, opt, 1)
    evals = collect.find(phase="eval")
    assert {r.step for r in evals} == {2}
    assert not any(r.topic in ("output_grads", "weights") for r in evals)
    assert collect.value(phase="eval", layer="0", topic="activations", metric="mean") == pytest.approx(
        float(expected.astype(np.float64).mean()), rel=1e-5
    )
    assert {r.step for r in collect.find(phase="train")} == {0, 1, 2}


def test_values_logged_after_optimizer_step_belong_to_that_step(collect: Collect) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect]) as p:
        for _ in range(3):
            loss = model(torch.randn(4, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
            losses.append(loss.item())
    recorded = sorted((r.step, r.value) for r in collect.find(metric="loss"))
    assert [s for s, _ in recorded] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in recorded], losses, rtol=1e-6)


def test_shared_module_called_three_times_is_three_layers(collect: Collect) -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(self.act(self.fc(self.act(x)))))

    model = Shared()
    with sonde.probe(model, store=None, sinks=[collect], topics=["activations"]):
        model(torch.randn(2, 4)).sum().backward()
        model(torch.randn(2, 4)).sum().backward()
    layers = {r.layer for r in collect.records}
    assert layers == {"act", "act:2", "act:3", "fc", "fc:2"}
    assert {r.step for r in collect.records} == {0, 1}


def test_tuple_dict_and_dataclass_outputs_use_the_first_float_tensor(collect: Collect) -> None:
    @dataclasses.dataclass
    class Out:
        mask: torch.Tensor
        hidden: torch.Tensor

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 5)  # batch_first=False: (T, B, F)
            self.proj = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            seq, _state = self.lstm(x)
            hidden = self.proj(seq)
            return {"ids": torch.zeros(2, dtype=torch.long), "out": Out(torch.ones(1, dtype=torch.bool), hidden)}

    model = Blocks()
    seen: dict[str, torch.Tensor] = {}
    model.lstm.register_forward_hook(lambda m, a, o: seen.__setitem__("lstm", o[0].detach().clone()))
    with sonde.probe(model, store=None, sinks=[collect], depth=1, topics=["activations"], metrics=["mean"]):
        model(torch.randn(7, 2, 3))["out"].hidden.sum().backward()  # type: ignore[union-attr]
    assert collect.value(layer="lstm", metric="mean") == pytest.approx(float(seen["lstm"].double().mean()), rel=1e-5)


def test_layer_selection_by_glob_callable_and_depth() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))

    def chosen(**kwargs: object) -> list[str]:
        with sonde.probe(model, store=None, **kwargs) as p:
            return list(p.layers)  # type: ignore[attr-defined]

    assert chosen() == ["0.0", "0.1", "1"]
    assert chosen(layers=["0.*"]) == ["0.0", "0.1"]
    assert chosen(layers=lambda n, m: isinstance(m, nn.Linear)) == ["0.0", "1"]
    assert chosen(depth=1) == ["0", "1"]
    assert chosen(layers=["0"]) == ["0"]  # a non-leaf named explicitly


def test_layer_filter_that_matches_nothing_shows_real_names() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(LayerFilterError, match=r"matched no layer of Sequential; names look like '0', '1'"):
        sonde.probe(model, store=None, layers=["encoder.*"])


def test_hooks_are_removed_on_close_and_double_probing_is_an_error() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, store=None, optimizer=opt):
        with pytest.raises(ProbeError, match="already probed"):
            sonde.probe(model, store=None)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with sonde.probe(model, store=None):  # probing again after close is fine
        pass


def test_without_optimizer_steps_follow_forward_passes_and_updates_are_reported_unavailable(
    collect: Collect, caplog: pytest.LogCaptureFixture
) -> None:
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="sonde"):
        with sonde.probe(model, store=None, sinks=[collect]) as p:
            train(model, p, None, 2)
    assert "weight_updates and bias_updates are unavailable" in caplog.text
    assert sorted({r.step for r in collect.records}) == [0, 1]
    assert not collect.find(topic="weight_updates")
    assert collect.find(topic="weight_grads", step=1)


def test_no_captured_tensor_outlives_its_step(collect: Collect) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs: list[weakref.ref[torch.Tensor]] = []
    model[2].register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect]) as p:
        train(model, p, opt, 2)
        gc.collect()
        assert refs and all(r() is None for r in refs)


def test_in_place_relu_gives_gradient_of_the_value_before_modification(collect: Collect) -> None:
    model = mlp()
    grads: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: grads.__setitem__("lin", g.detach().clone()))

    model[0].register_forward_hook(keep)
    with sonde.probe(model, store=None, sinks=[collect], topics=["output_grads"], metrics=["norm"]):
        model(torch.randn(5, 4)).sum().backward()
    assert collect.value(layer="0", metric="norm") == pytest.approx(float(grads["lin"].double().norm()), rel=1e-5)


def test_nan_tensors_are_recorded_faithfully(collect: Collect) -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with sonde.probe(model, store=None, sinks=[collect], topics=["weights", "activations"]):
        model(torch.randn(4, 3)).sum().backward()
    assert collect.value(layer="0", topic="weights", metric="nonfinite_frac") == pytest.approx(1 / 9)
    assert np.isnan(collect.value(layer="0", topic="weights", metric="mean"))
    assert collect.value(layer="0", topic="activations", metric="nonfinite_frac") == pytest.approx(4 / 12)


def test_empty_batch_and_integer_inputs_record_nothing_and_do_not_crash(collect: Collect) -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with sonde.probe(model, store=None, sinks=[collect], topics=["inputs", "activations"]):
        model(torch.zeros(0, dtype=torch.long))
        model(torch.tensor([1, 2, 3])).sum().backward()
    assert not collect.find(layer="0", topic="inputs")  # token ids are not a floating-point tensor
    assert collect.find(layer="1", topic="inputs", step=1)
    assert not collect.find(step=0, metric="mean")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"topics": ["activation"]}, ConfigError, "unknown topic"),
        ({"metrics": ["meen"]}, ConfigError, "unknown metric 'meen'; registered metrics are: .*mean"),
        ({"sinks": ["tensorbored"]}, ConfigError, "unknown sink 'tensorbored'"),
        ({"every": 0}, ConfigError, "every= expects a positive int"),
        ({"depth": 0}, ConfigError, "depth= expects"),
        ({"optimizer": "sgd"}, ConfigError, "optimizer= expects a torch.optim.Optimizer"),
    ],
)
def test_bad_arguments_fail_at_probe_time_with_a_clear_message(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        sonde.probe(mlp(), store=None, **kwargs)


def test_wrong_model_type_is_a_clear_error() -> None:
    with pytest.raises(ProbeError, match="expects a torch.nn.Module, got builtins.dict"):
        sonde.probe({"not": "a model"})


def test_unwritable_store_fails_at_probe_not_later(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError):
        sonde.probe(mlp(), store=str(blocker / "sub" / "sonde.db"))


def test_log_rejects_unknown_names() -> None:
    with sonde.probe(mlp(), store=None) as p:
        with pytest.raises(ConfigError, match="takes loss, labels, outputs; got unexpected acc"):
            p.log(acc=1.0)


def test_a_failing_sink_never_stops_training_and_the_others_keep_everything(
    collect: Collect, caplog: pytest.LogCaptureFixture
) -> None:
    class DiskFull(sonde.sinks.Sink):
        name = "diskfull"

        def write(self, records: object) -> None:
            raise OSError(28, "No space left on device")

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.ERROR, logger="sonde"):
        with sonde.probe(model, store=None, optimizer=opt, sinks=[DiskFull(), collect]) as p:
            train(model, p, opt, 3)
    assert "sink 'diskfull' failed" in caplog.text and "No space left on device" in caplog.text
    assert sorted({r.step for r in collect.records}) == [0, 1, 2]


def test_a_failing_metric_is_reported_and_the_rest_are_recorded(
    collect: Collect, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(sonde.metrics.Metric):
        name = "broken"
        topics = ("activations",)

        def update(self, capture: object) -> None:
            raise RuntimeError("boom")

    model = mlp()
    with caplog.at_level(logging.ERROR, logger="sonde"):
        with sonde.probe(model, store=None, sinks=[collect], metrics=[Broken(), "mean"]):
            model(torch.randn(2, 4)).sum().backward()
    assert "metric 'broken' failed" in caplog.text
    assert collect.find(metric="mean", topic="activations")


@pytest.mark.parametrize("as_keyword", [False, True])
def test_a_step_with_a_closure_records_the_gradients_it_consumes(collect: Collect, as_keyword: bool) -> None:
    """``opt.step(closure)`` (Lightning always, LBFGS) runs forward and backward after the pre-step
    hook: the gradients, weights and updates of step k are those of the closure's backward."""
    torch.manual_seed(0)
    model = mlp()
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    with sonde.probe(model, store=None, optimizer=opt, metrics=["norm"], sinks=[collect]):
        for x, y in data:
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure=closure) if as_keyword else opt.step(closure)
    expected: dict[str, list[float]] = {"weights": [], "weight_grads": [], "weight_updates": []}
    for x, y in data:  # the same steps, by hand
        twin.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        w, g = twin[0].weight.detach().numpy().copy(), twin[0].weight.grad.numpy().copy()
        expected["weights"].append(float(np.linalg.norm(w)))
        expected["weight_grads"].append(float(np.linalg.norm(g)))
        expected["weight_updates"].append(float(np.linalg.norm(-0.1 * g)))
        with torch.no_grad():
            for param in twin.parameters():
                param -= 0.1 * param.grad
    for topic, values in expected.items():
        got = [collect.value(layer="0", topic=topic, metric="norm", step=k) for k in range(3)]
        np.testing.assert_allclose(got, values, rtol=1e-5, err_msg=topic)


def test_optimizer_wrappers_are_unwrapped_to_the_optimizer_they_step(collect: Collect) -> None:
    class Wrapper:  # as Accelerate's AcceleratedOptimizer: no hook tables of its own
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

        def step(self) -> None:
            self.optimizer.step()

        def zero_grad(self) -> None:
            self.optimizer.zero_grad()

    model = mlp()
    opt = Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with sonde.probe(model, store=None, optimizer=opt, metrics=["norm"], sinks=[collect]) as p:
        train(model, p, opt, 2)  # type: ignore[arg-type]
    assert sorted({r.step for r in collect.find(topic="weight_updates", layer="0")}) == [0, 1]
    with pytest.raises(ConfigError, match="optimizer= expects a torch.optim.Optimizer, got Wrapper"):
        sonde.probe(mlp(), store=None, optimizer=Wrapper(None))  # type: ignore[arg-type]
