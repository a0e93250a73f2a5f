"""Real architectures (``tests/zoo.py``: BERT, Llama, T5, ViT, ResNet, wav2vec2, Mixtral) trained 3
steps under the probe, with activation checkpointing where the model supports it, once eager and
once compiled.

Compiled: the model is ``torch.compile``'d (``aot_eager`` backend: dynamo and AOTAutograd without
code generation, to keep the test fast) and then given to the probe, with ``every=2``: steps 0 and
2 are recorded, and run eagerly (the probe's design, :mod:`sonde.probe.torch_compile`); step 1 runs
the compiled code. Dynamo's ``use_numpy_random_stream`` is on, so that wav2vec2's SpecAugment draws
its masks from numpy in compiled code as eagerly (by default dynamo draws them from torch's
generator, and the compiled run would train on other masks than an eager one).

Each test trains the model probed and an unprobed deep copy alike (compiled: the same compiled
model, its recorded steps run eagerly as the probe runs them), and checks:

* the recorded steps ran no compiled graph, and the unrecorded step ran compiled graphs;
* training is unchanged: the same losses and final parameters; compiled, also the losses of an
  unprobed run compiled at every step, within 1e-5 (``aot_eager``'s backward is not always
  bit-identical to eager's, and AdamW magnifies the difference in parameters whose gradients are
  near zero: after three steps, an all-eager and an all-compiled run's parameters differ by up to
  5e-7 in Llama, 2e-6 in Mixtral and 8e-5 in wav2vec2, and not at all in BERT, T5, ViT and ResNet,
  so the parameters are compared with the run computed alike);
* at every recorded step, every layer owning parameters of its own is recorded, and nothing is
  recorded at an unrecorded step; no layer name is made up (each recorded ``name:k`` is a module
  the unprobed forward called at least k times);
* the run's graph is in the store, with a node for every such layer;
* one Linear layer's values at the recorded steps, against numpy on the unprobed copy: its weights
  before each optimizer step, and its activations, which a plain forward hook catches in the
  unprobed copy's forward (where checkpointing recomputes that layer in backward, the hook sees the
  recomputation too, and the probe's activations still count each element once);
* a parametrized layer's weights (wav2vec2's weight-normed positional convolution): the tensor its
  parametrization computes, before each recorded step's optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sonde
from sonde.store import open_store
from zoo import ZOO, Animal

STEPS = 3
METRICS = ["mean", "std", "norm", "histogram"]
EVERY = {"eager": 1, "compiled": 2}  # compiled: step 1 runs the compiled code, steps 0 and 2 are recorded


class Backend:
    """``aot_eager``, counting the calls of the graphs it compiled: which steps ran compiled code."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._dynamo.backends.debugging import aot_eager

        compiled = aot_eager(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.calls += 1
            return compiled(*args)

        return run


BACKEND = Backend()  # one for every run, so that they share dynamo's cache


def prepare(model: nn.Module, execution: str) -> nn.Module:
    """The model as it is trained under ``execution``."""
    if execution == "eager":
        return model
    if execution == "compiled":
        return torch.compile(model, backend=BACKEND)
    raise ValueError(f"unknown execution {execution!r}")


@contextlib.contextmanager
def executing(execution: str) -> Iterator[None]:
    """Compiled code draws numpy's random numbers from numpy, as eager code does."""
    with torch._dynamo.config.patch(use_numpy_random_stream=execution == "compiled"):
        yield


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
          watch: Watch | None = None, eager_steps: Collection[int] = (),
          compiled_calls: list[int] | None = None) -> list[float]:
    """AdamW steps on the model's own loss; the random state is seeded alike for every run. The
    forward and backward of ``eager_steps`` run eagerly even where the model is compiled, and the
    ``watch`` sees them. ``compiled_calls`` gets each step's calls of compiled graphs."""
    torch.manual_seed(2)
    np.random.seed(2)  # wav2vec2's SpecAugment draws its masks from numpy
    losses = []
    for step, batch in enumerate(batches):
        calls = BACKEND.calls
        with contextlib.ExitStack() as eagerly:
            if step in eager_steps:
                eagerly.enter_context(torch.compiler.set_stance("force_eager"))
                if watch is not None:
                    eagerly.enter_context(watch.hooked())
            loss = model(**batch).loss
            loss.backward()
        if watch is not None:
            watch.snapshot()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if compiled_calls is not None:
            compiled_calls.append(BACKEND.calls - calls)
    return losses


class Watch:
    """Plain forward hooks on the unprobed copy, installed for the steps that run eagerly (as the
    probe's are for its recorded steps, so that the compiled steps run the same compiled code as the
    probed model's): how many times each module is called in each forward (from the root's pre-hook
    to its hook), and the watched layer's outputs (in forward and recomputation alike); and the
    watched layer's weight before each optimizer step."""

    def __init__(self, model: nn.Module, watch: str) -> None:
        self.model = model
        self.watched = model.get_submodule(watch)
        self.in_forward = False
        self.calls: dict[str, int] = {}  # most calls of a module in one forward
        self.outputs: list[list[np.ndarray]] = []  # per step
        self.weights: list[np.ndarray] = []  # before each optimizer step
        # The tensors parametrizations compute (wav2vec2's weight-normed convolution's weight), by layer.
        self.parametrized = {name: m for name, m in model.named_modules() if parametrize.is_parametrized(m)}
        self.computed: list[dict[str, np.ndarray]] = []
        self._step_calls: dict[str, int] = {}

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [module.register_forward_hook(self._hook(name, module))
                   for name, module in self.model.named_modules()]
        handles.append(self.model.register_forward_pre_hook(self._start))
        handles.append(self.model.register_forward_hook(self._end))  # after the above: the root's call is counted
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _start(self, module: nn.Module, args: Any) -> None:
        self.in_forward = True
        self.outputs.append([])
        self._step_calls = {}

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        self.in_forward = False  # what runs from here on (checkpointing's recomputations) is backward

    def _hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if module is self.watched:
                self.outputs[-1].append(output.detach().double().numpy().copy())
            if self.in_forward:
                self._step_calls[name] = self._step_calls.get(name, 0) + 1
                self.calls[name] = max(self.calls.get(name, 0), self._step_calls[name])
        return hook

    def snapshot(self) -> None:
        self.weights.append(self.watched.weight.detach().double().numpy().copy())
        with torch.no_grad():
            self.computed.append({name: m.weight.double().numpy().copy() for name, m in self.parametrized.items()})


def owning_layers(model: nn.Module) -> set[str]:
    """Modules with parameters of their own (a parametrized one's are held below it, in its
    ``parametrizations``, whose modules are part of it)."""
    internal = {id(m) for owner in model.modules() if parametrize.is_parametrized(owner)
                for m in owner.parametrizations.modules()}  # type: ignore[union-attr]
    return {name or "(root)" for name, m in model.named_modules() if id(m) not in internal
            and (parametrize.is_parametrized(m) or next(m.parameters(recurse=False), None) is not None)}


def base(layer: str) -> tuple[str, int]:
    name, _, k = layer.rpartition(":")
    return (name, int(k)) if name and k.isdigit() else (layer, 1)


@pytest.mark.parametrize("execution", ["eager", "compiled"])
@pytest.mark.parametrize("animal", list(ZOO.values()), ids=list(ZOO))
def test_zoo_trains_unchanged_and_records_every_layer(animal: Animal, execution: str, tmp_path: Path) -> None:
    every = EVERY[execution]
    recorded = list(range(0, STEPS, every))
    model = animal.model()
    reference = copy.deepcopy(model)
    batches = animal.batches(STEPS)

    with executing(execution):
        watch = Watch(reference, animal.watch)
        expected_losses = train(prepare(reference, execution), torch.optim.AdamW(reference.parameters(), lr=1e-2),
                                batches, watch, eager_steps=recorded)
        if execution == "compiled":
            all_compiled = copy.deepcopy(model)
            compiled_losses = train(prepare(all_compiled, execution),
                                    torch.optim.AdamW(all_compiled.parameters(), lr=1e-2), batches)

        probed = prepare(model, execution)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        compiled_calls: list[int] = []
        with sonde.probe(probed, optimizer=opt, store=tmp_path / "s.db", every=every, metrics=METRICS) as p:
            losses = train(probed, opt, batches, compiled_calls=compiled_calls)
    run = p.run
    # Recorded steps ran eagerly, the others the compiled graphs (forward and backward).
    assert [calls > 0 for calls in compiled_calls] == [step not in recorded for step in range(STEPS)]

    # Training unchanged.
    assert losses == pytest.approx(expected_losses, rel=0, abs=1e-6)
    for (name, param), (_, ref_param) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(param, ref_param, rtol=0, atol=1e-6, msg=name)
    if execution == "compiled":
        assert losses == pytest.approx(compiled_losses, rel=1e-5, abs=1e-6)

    with open_store(tmp_path / "s.db") as store:
        records = store.load(run)
        histograms = store.load(run, layers=animal.watch, topics="activations", metrics="histogram", arrays=True)
        graph = store.get_graph(run)

    # Every layer owning parameters recorded (one never called, as T5's ``shared`` whose weight the
    # embeddings share, has weights only); no phantom call (a recomputation is not a call).
    expected = owning_layers(reference)
    assert set(records.step) == set(recorded)
    for step in recorded:
        at_step = records[(records.step == step) & records.topic.isin(["activations", "weights"])]
        assert expected - {base(layer)[0] for layer in at_step.layer} == set(), step
    called = set(records[records.topic.isin(["inputs", "activations", "output_grads"])].layer)
    phantoms = {layer for layer in called if base(layer)[1] > watch.calls.get(base(layer)[0], 0)}
    assert phantoms == set()

    # The graph is stored, with every layer owning parameters that the forward called.
    assert graph is not None and graph["nodes"]
    module_nodes = {base(n["name"])[0] for n in graph["nodes"] if n["kind"] == "module"}
    assert {layer for layer in expected if layer in watch.calls} - module_nodes == set()

    # One Linear layer against numpy on the unprobed copy.
    def value(topic: str, metric: str, step: int, layer: str = animal.watch) -> float:
        rows = records[(records.layer == layer) & (records.topic == topic) & (records.metric == metric)
                       & (records.step == step)]
        assert len(rows) == 1, (topic, metric, step, len(rows))
        return float(rows.value.iloc[0])

    assert len(watch.weights) == STEPS
    assert len(watch.outputs) == len(recorded)  # the forwards that ran eagerly
    for step, calls in zip(recorded, watch.outputs, strict=True):
        weight = watch.weights[step]
        assert value("weights", "mean", step) == pytest.approx(weight.mean(), rel=1e-5, abs=1e-8)
        assert value("weights", "std", step) == pytest.approx(weight.std(), rel=1e-5, abs=1e-8)
        assert len(calls) == (2 if animal.checkpointed else 1)  # the hook sees checkpointing recompute it
        np.testing.assert_allclose(calls[-1], calls[0], rtol=0, atol=1e-6)
        out = calls[0]
        assert value("activations", "mean", step) == pytest.approx(out.mean(), rel=1e-5, abs=1e-7)
        assert value("activations", "std", step) == pytest.approx(out.std(), rel=1e-5, abs=1e-7)
        assert value("activations", "norm", step) == pytest.approx(np.linalg.norm(out), rel=1e-5)
        counts = histograms[histograms.step == step].value
        assert len(counts) == 1 and counts.iloc[0].sum() == out.size  # each element counted once

    # A parametrized layer's weights are the tensor its parametrization computes (weight_norm's g·v/‖v‖).
    assert bool(watch.parametrized) == (animal.name == "wav2vec2")
    for step in recorded:
        for layer, weight in watch.computed[step].items():
            assert value("weights", "mean", step, layer) == pytest.approx(weight.mean(), rel=1e-5, abs=1e-8)
            assert value("weights", "norm", step, layer) == pytest.approx(np.linalg.norm(weight), rel=1e-5)
