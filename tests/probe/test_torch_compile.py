"""``torch.compile``d models: both orders, recorded steps exact, unrecorded steps untouched.

Most tests compile with the ``aot_eager`` backend (dynamo and AOTAutograd, no C++ code
generation: fast, and the graphs dynamo makes are the same as with inductor); one compiles with
the default inductor backend, as users do.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sonde
from collect import Collect

STEPS = 9
EVERY = 3  # recorded steps: 0, 3, 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)


def _train(call: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, probe: Any = None,
           each: Callable[[int], None] | None = None) -> list[float]:
    losses = []
    for step in range(STEPS):
        if each is not None:
            each(step)
        x, y = _batch(step)
        loss = nn.functional.cross_entropy(call(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if probe is not None:
            probe.log(loss=loss)
        losses.append(float(loss.detach()))
    return losses


def _compile(model: nn.Module, how: str, backend: str = "aot_eager", fullgraph: bool = True) -> Any:
    if how == "model.compile":
        model.compile(backend=backend, fullgraph=fullgraph)
        return model
    return torch.compile(model, backend=backend, fullgraph=fullgraph)


def _probed_run(order: str, backend: str = "aot_eager", every: int = EVERY,
                each: Callable[[nn.Module, int], None] | None = None) -> tuple[list[float], Collect, nn.Module]:
    """Train under the probe with the model compiled before ("compile-then-probe") or after it."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    collect = Collect()
    target = _compile(net, "torch.compile", backend) if order == "compile-then-probe" else net
    with sonde.probe(target, optimizer=opt, every=every, store=None, sinks=[collect]) as p:
        call = target if order == "compile-then-probe" else _compile(net, order, backend)
        losses = _train(call, opt, p, None if each is None else lambda step: each(net, step))
    return losses, collect, net


def _unprobed_compiled(backend: str = "aot_eager") -> list[float]:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    return _train(torch.compile(net, backend=backend, fullgraph=True), opt)


ORDERS = ["torch.compile", "model.compile", "compile-then-probe"]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("order", ORDERS)
def test_recorded_steps_equal_eager_recording_and_training_equals_the_unprobed_compiled_run(order: str) -> None:
    reference = _unprobed_compiled()
    torch._dynamo.reset()
    losses, collect, _ = _probed_run(order)
    np.testing.assert_allclose(losses, reference, rtol=1e-6, atol=1e-7)

    # the same run, eager and probed: same layers, same steps, same values
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    eager = Collect()
    with sonde.probe(net, optimizer=opt, every=EVERY, store=None, sinks=[eager]) as p:
        _train(net, opt, p)
    layers = {r.layer for r in collect.records}
    assert layers == {r.layer for r in eager.records}
    assert {"0", "1", "2", "3", "4"} <= layers  # the user's names, no "_orig_mod."
    assert sorted({r.step for r in collect.records if r.phase == "train"}) == [0, 3, 6]
    got = {(r.step, r.layer, r.topic, r.metric): r.value for r in collect.records}
    want = {(r.step, r.layer, r.topic, r.metric): r.value for r in eager.records}
    assert got.keys() == want.keys()
    for k, value in want.items():
        np.testing.assert_allclose(np.asarray(got[k], dtype=float), np.asarray(value, dtype=float),
                                   rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_recorded_values_match_the_model_computed_by_hand() -> None:
    """An independent check: the activations of layer 1 (Tanh) at recorded step 3, from the unprobed
    model replayed to that step, and the loss logged there."""
    _, collect, _ = _probed_run("torch.compile")
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for step in range(3):
        x, y = _batch(step)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    x, y = _batch(3)
    with torch.no_grad():
        hidden = net[1](net[0](x)).numpy()
        loss = float(nn.functional.cross_entropy(net(x), y))
    assert collect.value(step=3, layer="1", topic="activations", metric="mean") == pytest.approx(
        float(hidden.mean()), rel=1e-5)
    assert collect.value(step=3, layer="1", topic="activations", metric="std") == pytest.approx(
        float(hidden.std()), rel=1e-4)
    assert collect.value(step=3, topic="loss", metric="loss") == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_unrecorded_steps_run_the_compiled_code_with_no_hook_and_nothing_recompiles(order: str) -> None:
    _unprobed_compiled()
    unprobed_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    hooks: dict[int, int] = {}

    def count_hooks(net: nn.Module, step: int) -> None:
        hooks[step] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules() if m is not net)

    _probed_run(order, every=EVERY, each=count_hooks)
    graphs = counters["stats"]["unique_graphs"]
    assert unprobed_graphs >= 1
    # the unmonitored compile, plus at most one variant (a root hook the probe keeps on the model)
    assert unprobed_graphs <= graphs <= unprobed_graphs + 1
    assert {k: v for k, v in hooks.items() if k % EVERY} == dict.fromkeys([1, 2, 4, 5, 7, 8], 0)
    assert all(hooks[k] > 0 for k in (0, 3, 6))


def test_fullgraph_holds_and_inductor_compiles_once(caplog: pytest.LogCaptureFixture) -> None:
    """The default backend (inductor), fullgraph=True: no graph break on any step."""
    with caplog.at_level(logging.WARNING, logger="sonde"):
        losses, collect, _ = _probed_run("torch.compile", backend="inductor")
    assert counters["stats"]["unique_graphs"] == 1
    assert "failed" not in caplog.text
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert sorted({r.step for r in collect.records if r.topic == "activations"}) == [0, 3, 6]


def test_the_graph_of_a_compiled_model_is_built_with_the_users_names(tmp_path: Any) -> None:
    from sonde.store import open_store

    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    compiled = torch.compile(net, backend="aot_eager")
    with sonde.probe(compiled, optimizer=opt, every=EVERY, store=tmp_path / "s.db", run="c") as p:
        _train(compiled, opt, p)
    graph = open_store(tmp_path / "s.db").get_graph("c")
    assert graph is not None
    names = {node["name"] for node in graph["nodes"]}
    assert {"0", "2", "4"} <= names
    assert not any("_orig_mod" in name for name in names)


def test_evaluation_passes_of_a_compiled_model_are_recorded() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    compiled = torch.compile(net, backend="aot_eager")
    collect = Collect()
    x_eval = _batch(100)[0]
    with sonde.probe(compiled, optimizer=opt, every=EVERY, store=None, sinks=[collect]) as p:
        _train(compiled, opt, p)
        compiled.eval()
        with torch.no_grad():
            out = compiled(x_eval)
    with torch.no_grad():
        expected = net[0](x_eval).numpy()
    assert out.shape == (12, 3)
    assert collect.value(phase="eval", layer="0", topic="activations", metric="mean") == pytest.approx(
        float(expected.mean()), rel=1e-5)


def test_a_compiled_model_without_an_optimizer_counts_its_steps_when_given_compiled() -> None:
    """Without optimizer=, steps are forward passes: the compiled wrapper's root hooks see each one."""
    net = _net()
    compiled = torch.compile(net, backend="aot_eager")
    collect = Collect()
    with sonde.probe(compiled, every=EVERY, store=None, sinks=[collect]):
        for step in range(STEPS):
            compiled(_batch(step)[0]).sum().backward()
    assert sorted({r.step for r in collect.records if r.topic == "activations"}) == [0, 3, 6]


def test_copies_are_independent() -> None:
    """Probing one compiled copy leaves another copy's compiled code and hooks alone."""
    a = _net()
    b = copy.deepcopy(a)
    cb = torch.compile(b, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(a.parameters(), lr=0.2)
    with sonde.probe(a, optimizer=opt, every=EVERY, store=None, sinks=[Collect()]):
        out = cb(_batch(0)[0])
    assert out.shape == (12, 3)
    assert all(not m._forward_hooks for m in b.modules())


def test_a_model_compiled_after_probing_without_an_optimizer_runs_eagerly_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without optimizer= steps are forward passes, which a compiled forward would hide after step 0:
    the probe keeps every step eager (and warns), so every recorded step is still recorded."""
    net = _net()
    collect = Collect()
    with caplog.at_level(logging.WARNING, logger="sonde"), \
            sonde.probe(net, every=EVERY, store=None, sinks=[collect]):
        compiled = torch.compile(net, backend="aot_eager")
        for step in range(STEPS):
            compiled(_batch(step)[0]).sum().backward()
    assert sorted({r.step for r in collect.records if r.topic == "activations"}) == [0, 3, 6]
    assert caplog.text.count("every step runs eagerly") == 1


def test_a_compiled_optimizer_step_trains_as_the_plain_one() -> None:
    """``torch.compile(opt.step)``: the probe's optimizer hooks run inside the compiled step, and the
    stance they set around recorded steps is not traced."""
    runs = []
    for compile_step in (False, True):
        torch._dynamo.reset()
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        step_fn = torch.compile(opt.step, backend="aot_eager") if compile_step else opt.step
        collect = Collect()
        with sonde.probe(net, optimizer=opt, every=EVERY, store=None, sinks=[collect]) as p:
            losses = []
            for step in range(STEPS):
                x, y = _batch(step)
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                step_fn()
                opt.zero_grad()
                p.log(loss=loss)
                losses.append(float(loss.detach()))
        runs.append((losses, {(r.step, r.layer, r.topic, r.metric): r.value for r in collect.records
                              if not isinstance(r.value, np.ndarray)}))
    (plain_losses, plain), (compiled_losses, compiled) = runs
    np.testing.assert_allclose(compiled_losses, plain_losses, rtol=1e-6)
    assert compiled.keys() == plain.keys()
    for k, value in plain.items():
        assert compiled[k] == pytest.approx(value, rel=1e-5, abs=1e-7), k
