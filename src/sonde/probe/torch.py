"""The reference adapter: probes for any ``torch.nn.Module``, its subclasses unmodified.

Where each topic is captured:

* ``inputs``: forward pre-hook (before an in-place module overwrites its input);
* ``activations``: forward hook; the first floating-point tensor of the output, searched
  depth-first through tuples, lists, dicts and dataclasses (LSTM's ``(output, (h, c))`` gives
  ``output``; a transformer block's tuple gives its hidden states);
* ``output_grads``: a tensor hook on that output, fired by backward (for a tensor modified in
  place later, PyTorch passes the gradient of the value before the modification);
* ``weights``/``biases``/``weight_grads``/``bias_grads``: in the optimizer's pre-step hook, so
  they are exactly what the forward used and what the step consumed; without ``optimizer=``
  the parameters at the start of each train forward, and the gradients as backward
  accumulates them;
* ``weight_updates``/``bias_updates``: parameter after minus before the optimizer step.

Side passes (``probe_set=`` and ``sonde.metrics.TestAccuracy``) run at the start of a step
whose schedule wants them, before that step's training forward, nested in the root's forward
pre-hook: gradients off, every module in eval mode (each module's own mode is put back after),
the RNG state forked (dropout draws of training are unchanged), and the captures of the pass
routed only to the probe-set metrics (test passes are not captured at all).

Parameters whose name starts with ``bias`` are biases; every other parameter is a weight. A
layer owns the parameters below it that no deeper probed layer owns (for ``depth=1`` a whole
block's weights merge into one set of statistics).

Training as real scripts run it (docs/guides/pytorch.md has the details):

* gradients are unscaled under any ``torch.amp.GradScaler`` (:mod:`sonde.probe.torch_scaler`
  tells the probe each backward's scale), and a step the scaler skips is a step with zero
  updates and an alert;
* a forward that runs inside backward is activation checkpointing's recomputation: not a call,
  nothing recorded, except that a reentrant checkpoint's ``output_grads`` hook goes on the
  recomputed output (the graph is built from it);
* a parametrized module (:mod:`sonde.probe.torch_parametrize`) is one layer whose ``weights``
  is the tensor its parametrization computed for the forward;
* the layer hooks exist only while a recorded step (or an evaluation or probe-set pass) runs,
  and a ``torch.compile``'d model runs eagerly exactly then (:mod:`sonde.probe.torch_compile`):
  an unrecorded step runs no sonde code in the forward and backward, compiled or not.

Every hook body runs guarded: a failure is reported once and switches that part off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sonde.bus import Bus
from sonde.errors import ConfigError, ProbeError
from sonde.graph.job import GraphJob
from sonde.metrics.base import Metric
from sonde.metrics.registry import resolve_metrics
from sonde.metrics.tasks import StepLabels
from sonde.metrics.test_accuracy import TestAccuracy
from sonde.probe import distributed, kit, rank_checks, torch_compile, torch_scaler
from sonde.probe import torch_parametrize as parametrized
from sonde.probe.core import Probe, not_a_module
from sonde.records import NETWORK, Record
from sonde.schedules import Schedule
from sonde.sinks import Sink
from sonde.topics import GRADS_AND_UPDATES
from sonde.worker import Worker

__all__ = ["TorchProbe", "first_float_tensor", "select_layers", "unwrap_optimizer"]

log = logging.getLogger("sonde")

ROOT = "(root)"


def first_float_tensor(value: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``value``, depth-first through containers
    (:func:`~sonde.probe.kit.first_leaf`)."""
    found: torch.Tensor | None = kit.first_leaf(value, _is_float_tensor)
    return found


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps (the user's names), else ``model`` (FSDP2's
    ``fully_shard`` wraps nothing: the model and its modules keep their names)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and isinstance(model.module, nn.Module):
        return model.module
    return model


def _user_module(model: nn.Module) -> nn.Module:
    """The user's module under the wrappers a probe may be given: ``torch.compile``'s
    ``OptimizedModule`` and ``DistributedDataParallel``, in any nesting."""
    while True:
        inner = _unwrapped(torch_compile.unwrap(model))
        if inner is model:
            return model
        model = inner


def _in_trainer_ddp(model: nn.Module) -> bool:
    """Whether a trainer runs ``model`` under a wrapper that averages its gradients over the ranks
    while its callback probes the module itself: a Lightning module under the DDP strategy (the
    strategy wraps it), or a model ``sonde.transformers.SondeCallback`` marked as run distributed
    by the Hugging Face Trainer (``_sonde_ranks_average``)."""
    if getattr(model, "_sonde_ranks_average", False):
        return True
    strategy = getattr(getattr(model, "_trainer", None), "strategy", None)
    return isinstance(getattr(strategy, "model", None), torch.nn.parallel.DistributedDataParallel)


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def select_layers(model: nn.Module, layers: kit.LayerFilter = None, depth: int | None = None) -> dict[str, nn.Module]:
    """The modules to probe, by name, in registration order (:func:`~sonde.probe.kit.choose_layers`'s
    rule; the root, ``(root)``, only when it holds parameters of its own)."""
    internal = parametrized.internals(model)  # a parametrization's modules are part of its layer
    named = [(name or ROOT, m, 0 if not name else name.count(".") + 1, parametrized.is_leaf(m),
              parametrized.owns_params(m)) for name, m in model.named_modules() if id(m) not in internal]
    return kit.choose_layers(named, layers, depth, type(model).__name__)


def _probe_set_parts(probe_set: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``probe_set=inputs`` or ``(inputs, labels)`` as tensors, checked."""
    if probe_set is None:
        return None, None
    inputs, labels = (probe_set[0], probe_set[1]) if isinstance(probe_set, (tuple, list)) else (probe_set, None)
    if isinstance(probe_set, (tuple, list)) and len(probe_set) != 2:
        raise ConfigError(f"probe_set= expects inputs or (inputs, labels), got a sequence of {len(probe_set)} items")
    if not isinstance(inputs, (torch.Tensor, np.ndarray)):
        raise ConfigError(
            f"probe_set inputs must be a tensor or numpy array (samples first), got {type(inputs).__name__}"
        )
    inputs = torch.as_tensor(inputs)
    if inputs.ndim == 0 or inputs.shape[0] < 8:
        raise ConfigError(f"probe_set needs at least 8 samples (first dimension), got shape {tuple(inputs.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.ndim == 0 or labels.shape[0] != inputs.shape[0]:
            raise ConfigError(
                f"probe_set labels must be integer class ids with one entry (or one row) per input: inputs "
                f"{tuple(inputs.shape)}, labels {tuple(labels.shape)} of dtype {labels.dtype}"
            )
    return inputs, labels


def _split_metrics(
    metrics: Sequence[str | Metric] | None, has_probe_set: bool, has_labels: bool
) -> tuple[list[Metric], list[Metric], list[TestAccuracy]]:
    """(metrics of training captures, metrics of the probe set, test-loader evaluations)."""
    resolved = resolve_metrics(metrics)
    tests = [m for m in resolved if isinstance(m, TestAccuracy)]
    on_probe_set: list[Metric] = []
    for m in resolved:
        use = m.probe_set
        if use == "required" and not has_probe_set:
            raise ConfigError(
                f"metric {m.name!r} compares activations on a fixed probe set; pass probe_set=inputs "
                "(or (inputs, labels)) to sonde.probe"
            )
        if use in ("required", "optional") and has_probe_set:
            if use == "optional" and not has_labels:
                raise ConfigError(f"metric {m.name!r} needs labels: pass probe_set=(inputs, labels)")
            # The probe set is evaluated exactly when the metric computes: its pass schedule is
            # compute_every (else every), and each pass computes.
            m.schedule = m.compute_schedule or m.schedule
            m.compute_schedule = None
            on_probe_set.append(m)
    main = [m for m in resolved if m not in on_probe_set and not isinstance(m, TestAccuracy)]
    return main, on_probe_set, tests


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` whose steps the probe hooks.

    Wrappers that keep the real optimizer in ``.optimizer`` and call its ``step`` (Accelerate's
    ``AcceleratedOptimizer``, which Hugging Face's Trainer uses; Lightning's ``LightningOptimizer``)
    are unwrapped: their own hook tables are never run (Accelerate's is never even created).
    """
    seen = optimizer
    while (optimizer is not None and not hasattr(optimizer, "_optimizer_step_post_hooks")
           and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)):
        optimizer = optimizer.optimizer
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer= expects a torch.optim.Optimizer, got {type(seen).__name__}")
    return optimizer


def _recomputing() -> bool:
    """Whether a forward runs inside backward: activation checkpointing recomputing a segment
    (reentrant or not, ``torch.utils.checkpoint`` or a library's wrapper of it)."""
    return bool(torch._C._current_graph_task_id() != -1)


class TorchProbe(Probe):
    """Probe of a ``torch.nn.Module``; see :func:`sonde.probe` for the arguments."""

    framework = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        run: str | None = None,
        store: Any = "sonde.db",
        server: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        layers: kit.LayerFilter = None,
        topics: Sequence[str] | None = None,
        metrics: Sequence[str | Metric] | None = None,
        every: int | Schedule | None = None,
        budget: float = 0.05,
        max_interval: int = 100,
        depth: int | None = None,
        sinks: Sequence[str | Sink] | None = None,
        resume: bool = False,
        per_rank: bool = False,
        probe_set: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise not_a_module(model)
        if getattr(model, "_sonde_probe", None) is not None:
            raise ProbeError(
                f"{type(model).__name__} is already probed by run {model._sonde_probe().run!r}; "  # type: ignore[operator]
                "close that probe first (leave its `with` block) or probe a different model"
            )
        optimizer = unwrap_optimizer(optimizer)
        self.model = model
        # Layers are named as the user's module names them (``encoder.0``, not DDP's ``module.encoder.0``
        # nor a compiled model's ``_orig_mod.encoder.0``).
        self.named = _user_module(model)
        self.optimizer = optimizer
        self.layers = self._select_layers(layers, depth)
        self.params = self._assign_params()
        # Parameters a parametrization computes a module's tensor from (weight_norm's original0/1):
        # their gradients and updates are recorded, their values are not (the computed tensor is).
        self._computed_from = parametrized.computed_from(model)
        self._probe_inputs, self._probe_labels = _probe_set_parts(probe_set)
        main, on_probe_set, self.test_evaluators = _split_metrics(
            metrics, self._probe_inputs is not None, self._probe_labels is not None
        )
        super().__init__(
            model, self.layers, {name: {p: t.shape for p, t in params} for name, params in self.params.items()},
            optimizer=type(optimizer).__name__ if optimizer else None,
            config={} if self._probe_inputs is None else {"probe_set": list(self._probe_inputs.shape)},
            run=run, store=store, server=server, layers=layers, topics=topics, metrics=main, every=every,
            budget=budget, max_interval=max_interval, depth=depth, sinks=sinks, resume=resume, per_rank=per_rank,
        )
        self.step_labels = StepLabels()  # labels logged in the current train step (task metrics pair them)
        for metric in self.metrics:
            if metric.uses_step_labels:
                metric.step_labels = self.step_labels  # type: ignore[attr-defined]
        self.probe_bus: Bus | None = None
        if on_probe_set:
            self.probe_bus = Bus(self.run, on_probe_set, topics=["activations"], schedule=self.every)
            self.share_budget(self.probe_bus)
            self.probe_bus.layer_types = getattr(self.bus, "layer_types", {})
            if self.bus.worker is None:
                self.bus.worker = Worker(self._emit, name=f"sonde-worker-{self.run}")
            self.probe_bus.worker = self.bus.worker
        self._pass_mode: str | None = None  # "probe" or "test" while a side pass runs
        self._pass_labels: torch.Tensor | None = None
        self.count_steps(optimizer is not None, lost="weight_updates and bias_updates",
                         passes="training-mode forward passes")
        self._handles: list[Any] = []  # hooks for the probe's lifetime
        self._armed: list[Any] | None = None  # the layer hooks, while installed (see _arm)
        self._eager = torch_compile.EagerStance()
        self._eval_armed = False  # the layer hooks were installed for the evaluation pass now running
        self._compiled = False  # the model's forward was seen called through torch.compile
        self._always_armed = False  # compiled after probing, without an optimizer: every step runs eagerly
        self._graph_job: GraphJob | None = None  # the graph's trace (rank 0; see _attach)
        self.call_names = kit.CallNames()
        self._names: dict[int, list[str]] = {}
        self.param_publisher = kit.ParameterPublisher(self)
        self._forward_phase: str | None = None  # the phase of the root forward now running
        self._replays: dict[int, list[tuple[str, int]]] = {}  # module -> calls whose graph a recomputation builds
        self._loss_scale: torch.Tensor | None = None  # the GradScaler's scale of the current step's backward
        self._optimizer_steps = 0  # optimizer steps seen: a scaler step that adds none was skipped
        self._steps_before_scaler = -1
        # Under DDP and FSDP2 the loss optimised is the mean of the ranks' losses: a rank's output_grads
        # are its own loss's divided by the number of ranks (as the wrapper averages the parameters' gradients).
        self._rank_share = (1.0 / self.ranks[1] if self.ranks is not None
                            and (distributed.averages_gradients(model) or _in_trainer_ddp(model)) else None)
        # FSDP2: the statistics of a sharded parameter merge every rank's local shard.
        shards, self._not_counted = distributed.shards(self.params, self.rank, kit.param_topic)
        if isinstance(self.bus.engine.merge_ranks, distributed.RankMerge):
            self.bus.engine.merge_ranks.shards = shards
            if self._rank_share is not None:  # replicated parameters: identical on every rank, or out of sync
                self.bus.engine.merge_ranks.checks.append(rank_checks.DesyncCheck(
                    self.run, [(layer, [p for _, p in params]) for layer, params in self.params.items()]))
        self._attach()

    # -- attaching ---------------------------------------------------------------------------
    def _select_layers(self, layers: kit.LayerFilter, depth: int | None) -> dict[str, Any]:
        """The layers to probe (an adapter over another framework's modules names them its way)."""
        return select_layers(self.named, layers, depth)

    def _assign_params(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each parameter goes to the deepest probed layer above it."""
        owners: dict[str, list[tuple[str, nn.Parameter]]] = {}
        prefixes = sorted(self.layers, key=lambda n: -len(n))
        for full_name, param in self.named.named_parameters():
            for layer in prefixes:
                if layer == ROOT or full_name.startswith(layer + "."):
                    owners.setdefault(layer, []).append((full_name, param))
                    break
        return owners

    def _attach(self) -> None:
        model = self.model
        model._sonde_probe = weakref.ref(self)  # type: ignore[assignment]
        self._handles.append(model.register_forward_pre_hook(self._on_root_start, prepend=True))
        self._handles.append(model.register_forward_hook(self._on_root_end, always_call=True))
        torch_scaler.listen(self)
        # The graph is traced once, from the first forward's arguments, on a background thread. Its hook
        # runs before the step hook, which may nest a side pass (probe set, test loader) in that forward.
        # Under torch.distributed rank 0 alone writes the graph, traced from the module DDP wraps (tracing
        # the wrapper would copy its process group and run its collectives on the tracing thread).
        if self.rank == 0:
            self._graph_job = GraphJob(self.named, self._runners)
            self._graph_job.handle = model.register_forward_pre_hook(
                self._graph_job.on_forward, with_kwargs=True, prepend=True
            )
            self._handles.append(self._graph_job.handle)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_post))
        else:
            for layer, params in self.params.items():
                for param_name, param in params:
                    if param.requires_grad:
                        topic = GRADS_AND_UPDATES[kit.param_topic(param_name)][0]
                        self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(layer, topic)))
        self._arm(self._records(self.step))

    # -- layer hooks: only while something is recorded ---------------------------------------------
    def _hook_layers(self) -> list[Any]:
        """Install the layer hooks; returns their handles."""
        handles = []
        for name, module in self.layers.items():
            handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            handles.append(module.register_forward_hook(self._post_hook(name)))
        for layer, tensor_name, computed in parametrized.parametrized_tensors(self.named, self.layers):
            handles.append(computed.register_forward_hook(self._effective_hook(layer, tensor_name)))
        return handles

    def _records(self, step: int) -> bool:
        """Whether train ``step`` records anything or runs a side pass (its forward needs the layer hooks,
        and its root hooks must run)."""
        if self.closed or self.switched_off:
            return False
        return (self._always_armed or self._recorded(step)
                or (self.probe_bus is not None and self.probe_bus.wants("activations", step))
                or any(m.due_at(step, self.step_schedule) for m in self.test_evaluators))

    def _arm(self, on: bool) -> None:
        """Install (``on``) or remove the layer hooks (:mod:`sonde.probe.torch_compile`): they exist only
        while a recorded step, an evaluation pass or a probe-set pass runs, and compiled code runs
        eagerly exactly then. An unrecorded step runs no sonde code in the model's forward and backward."""
        self._guard("installing the layer hooks", lambda: self._set_armed(on))

    def _set_armed(self, on: bool) -> None:
        if on and self._armed is None:
            self._armed = []
            self._eager.enter()
            self._armed.extend(self._hook_layers())
        elif not on and self._armed is not None:
            handles, self._armed = self._armed, None
            try:
                for handle in handles:
                    handle.remove()
            finally:
                self._eager.exit()

    def forward_unseen(self) -> bool:
        return self._compiled and self._armed is None

    def optimizer_stepped(self) -> None:
        super().optimizer_stepped()
        # The next train forward starts step + 1: its hooks (and eager execution) are decided now, before
        # it runs, because a compiled forward runs none of the probe's code to decide it then.
        self._arm(self._records(self.step + 1))

    def _effective_hook(self, layer: str, tensor_name: str) -> Callable[[nn.Module, Any, Any], None]:
        """A parametrized tensor's ``weights``/``biases``: the value its parametrizations computed for
        the forward (each step's first train forward), not the parameters they compute it from."""
        topic = kit.param_topic(tensor_name)
        published = [-1]

        def capture(output: Any) -> None:
            if (self._pass_mode is not None or _recomputing() or published[0] == self.step
                    or not isinstance(output, torch.Tensor) or self._layer_phase() != "train"):
                return
            published[0] = self.step
            if self.wants(topic):
                self.publish(layer, topic, output.detach(), phase="train")

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._guard(f"{topic} capture", lambda: capture(output))

        return hook

    def detach(self) -> None:
        self._set_armed(False)
        torch_scaler.unlisten(self)
        if self._graph_job is not None:
            self._graph_job.wait()  # before the sinks close, so that they get the graph
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.param_publisher.clear()
        probe_bus = getattr(self, "probe_bus", None)
        if probe_bus is not None:
            probe_bus.report_failures()  # the probe-set pass's metrics (the main bus reports at close)
        if getattr(self.model, "_sonde_probe", None) is not None:
            del self.model._sonde_probe

    # -- helpers -----------------------------------------------------------------------------
    def current_phase(self) -> str:
        return "train" if self.named.training and torch.is_grad_enabled() else "eval"

    def as_tensor(self, value: Any, topic: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (int, float)):
            return torch.tensor(float(value))
        raise ConfigError(f"Probe.log({topic}=...) expects a tensor or a number, got {type(value).__name__}")

    def _publish_params(self, grads: bool, phase: str = "train", snapshot: bool = False) -> None:
        """Publish weights and biases (and their gradients); with ``snapshot``, also keep each
        parameter's value before the optimizer step for its update, copied in the same pass."""
        in_optimizer = (
            {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if snapshot and self.optimizer is not None else None
        )
        skipped = self._not_counted  # counted on another rank (distributed.shards)
        self.param_publisher.before_step(
            ((layer, name, param) for layer, params in self.params.items() for name, param in params
             if id(param) not in skipped),
            value=torch.Tensor.detach, grad=(lambda p: p.grad) if grads else None,
            updated=None if in_optimizer is None else (lambda p: id(p) in in_optimizer),
            shown=(lambda p: id(p) not in self._computed_from) if self._computed_from else None, phase=phase,
        )

    # -- hooks ---------------------------------------------------------------------------------
    def _on_root_start(self, module: nn.Module, args: Any) -> None:
        if torch_compile.tracing() or self._on_graph_thread():
            return  # dynamo traces a compiled model's root hooks into nothing: they run when the model runs eagerly
        self.begin_batch()
        if self._pass_mode is None and not _recomputing():
            # Layers take the phase of the whole forward: a reentrant checkpoint runs its first
            # forward under no_grad inside a training forward, and that is still training.
            self._forward_phase = self.current_phase()
            self._replays.clear()
            if self._forward_phase == "train" and not self._compiled:
                self._compiled = torch_compile.called_compiled(self.named)
                if self._compiled and self.optimizer is None and torch_compile.unwrap(self.model) is self.model:
                    # Steps are forwards, and a compiled forward runs none of these hooks: counting them
                    # needs every forward to run eagerly.
                    self._always_armed = True
                    log.warning("sonde: %s was compiled after sonde.probe(...) was given it without optimizer=; "
                                "its steps are counted by forward passes, which compiled code does not show, so "
                                "every step runs eagerly. Pass optimizer=, or give sonde.probe the compiled module "
                                "(torch.compile first), to keep unrecorded steps compiled", type(self.named).__name__)
            if self._forward_phase == "eval" and self._armed is None and not self.closed and not self.switched_off:
                self._eval_armed = True  # evaluation passes are recorded at any step
                self._arm(True)

    def _on_root_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch_compile.tracing() or self._on_graph_thread():
            return
        if self._pass_mode is None and not _recomputing():
            self._forward_phase = None
            if self._eval_armed:
                self._eval_armed = False
                self._arm(False)

    def _on_graph_thread(self) -> bool:
        """Whether the graph is being traced on this thread: a trace that reaches the real modules
        (Lightning's DDP strategy redirects the module's forward to its ``training_step``) is no call."""
        job = self._graph_job
        return job is not None and job._thread is threading.current_thread()

    def _layer_phase(self) -> str:
        return self._forward_phase if self._forward_phase is not None else self.current_phase()

    def begin_batch(self) -> None:
        """What the model's forward pre-hook does: layers called from here on are named afresh
        (``name``, ``name:2``, ...), and a training pass may start a step (and its side passes).

        For trainers whose step may never call the probed module's own forward (a Lightning
        ``training_step`` that calls ``self.net(x)``): :class:`sonde.lightning.SondeCallback`
        calls it at each batch start; the forward pre-hook calling it again before any layer ran changes nothing.
        """
        def run() -> None:
            self.call_names.clear()
            if self._pass_mode is not None:
                return  # the forward of a side pass, nested in a training forward's pre-hook
            if _recomputing():
                return  # activation checkpointing replays the forward inside backward: not a new pass
            if self.current_phase() == "train":
                new_step = self.begin_train_forward()
                if new_step and self.optimizer is None:
                    self._publish_params(grads=False)
                if new_step:
                    self._loss_scale = None
                    self._side_passes(self.step)
                    self.call_names.clear()
                    self._arm(self._records(self.step))

        self._guard("step bookkeeping", run)

    # -- side passes: the probe set and test loaders ----------------------------------------------
    probe_batch_size = 256  # rows of the probe set per forward (and per minibatch-CKA chunk)

    def _side_passes(self, step: int) -> None:
        """Evaluate the probe set and the test loaders due at ``step``, leaving the model as it was."""
        probe_due = self.probe_bus is not None and self.probe_bus.wants("activations", step)
        tests = [m for m in self.test_evaluators if m.due_at(step, self.step_schedule)]
        if not (probe_due or tests):
            return
        if probe_due:
            self._arm(True)  # the pass's activations come from the layer hooks (begin_batch settles them after)
            self._guard("probe-set pass", lambda: self._probe_set_pass(step))
        for metric in tests:
            self._guard("test_accuracy evaluation", lambda m=metric: self._test_pass(m, step))  # type: ignore[misc]

    @contextlib.contextmanager
    def _side_pass(self, mode: str) -> Iterator[None]:
        """No grad, eval mode, forked RNG; every module's mode is restored after, even on error."""
        modes = [(m, m.training) for m in self.model.modules()]
        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        self._pass_mode = mode
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self.model.eval()
                yield
        finally:
            for module, training in modes:
                module.training = training
            self._pass_mode = None
            self._pass_labels = None

    def _probe_set_pass(self, step: int) -> None:
        assert self._probe_inputs is not None and self.probe_bus is not None
        inputs, labels = self._probe_inputs, self._probe_labels
        device = next((p.device for p in self.model.parameters()), inputs.device)
        n = inputs.shape[0]
        try:
            with self._side_pass("probe"):
                for chunk in np.array_split(np.arange(n), math.ceil(n / self.probe_batch_size)):
                    index = torch.as_tensor(chunk)
                    self._pass_labels = None if labels is None else labels[index]
                    self.model(inputs[index].to(device))
        except Exception:
            self.probe_bus.discard("train")  # partial chunks of a pass that broke off: the next starts clean
            raise
        self._emit(self.probe_bus.flush("train", step))

    def _test_pass(self, metric: TestAccuracy, step: int) -> None:
        with self._side_pass("test"):
            values = metric.evaluate(self.model)
        self._emit([Record(self.run, step, "eval", NETWORK, "outputs", k, v) for k, v in values.items()])

    # -- labels of training batches, for the task metrics -----------------------------------------
    def log(self, **values: Any) -> None:
        super().log(**values)
        labels = values.get("labels")
        if labels is not None and self.current_phase() == "train":
            self.step_labels.append(labels)

    def finish_step(self, final: bool = False) -> None:
        try:
            super().finish_step(final)
        finally:
            self.step_labels.clear()

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def capture(module: nn.Module, args: Any) -> None:
            call = self.call_names(name)
            self._names.setdefault(id(module), []).append(call)
            if self._pass_mode is not None:
                return
            phase = self._layer_phase()
            if self.wants("inputs", phase):
                tensor = first_float_tensor(args)
                if tensor is not None:
                    self._guard("inputs capture", lambda: self.publish(call, "inputs", tensor, phase=phase))

        def hook(module: nn.Module, args: Any) -> None:
            if torch_compile.tracing() or _recomputing() or self._on_graph_thread():
                return  # a recomputation is not a call
            self._guard("layer forward pre-hook", lambda: capture(module, args))

        return hook

    def _post_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def capture(module: nn.Module, output: Any) -> None:
            stack = self._names.get(id(module))
            call = stack.pop() if stack else name
            phase = self._layer_phase()
            tensor = first_float_tensor(output)
            if tensor is None:
                return
            if self._pass_mode is not None:
                if self._pass_mode == "probe" and self.probe_bus is not None:
                    bus, labels = self.probe_bus, self._pass_labels
                    self._guard("probe-set capture", lambda: bus.publish(
                        call, "activations", tensor, phase="train", step=self.step, labels=labels))
                return
            if self.wants("activations", phase):
                self._guard("activations capture", lambda: self.publish(call, "activations", tensor, phase=phase))
            if phase == "train" and self.wants("output_grads"):
                if tensor.requires_grad:
                    self._guard("output_grads capture", lambda: tensor.register_hook(
                        self._output_grad_hook(call, self.step)))
                elif not torch.is_grad_enabled():
                    # A reentrant checkpoint's first forward: the graph (and so the gradient) is
                    # the recomputation's. Recomputations run the segments last to first.
                    self._replays.setdefault(id(module), []).append((call, self.step))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if torch_compile.tracing() or self._on_graph_thread():
                return
            if _recomputing():
                self._guard("output_grads capture", lambda: self._recomputed(module, output))
                return
            self._guard("layer forward hook", lambda: capture(module, output))

        return hook

    def _recomputed(self, module: nn.Module, output: Any) -> None:
        """A layer's call replayed in backward by activation checkpointing: nothing is recorded of
        it, but where its output is the one the gradient flows through (reentrant checkpointing),
        the original call's ``output_grads`` hook goes on it."""
        pending = self._replays.get(id(module))
        tensor = first_float_tensor(output)
        if pending and tensor is not None and tensor.requires_grad:
            call, step = pending.pop()
            tensor.register_hook(self._output_grad_hook(call, step))

    def _unscaled(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` divided by the loss scale of the GradScaler whose scaled loss made it (on the
        device, no host read: the scale tensor is read before ``update()`` changes it in place)."""
        scale = self._loss_scale
        if scale is None:
            return grad
        return grad / scale.to(grad.device, non_blocking=True)

    def _output_grad_hook(self, call: str, step: int) -> Callable[[torch.Tensor], None]:
        share = self._rank_share

        def hook(grad: torch.Tensor) -> None:
            if not self.closed and step == self.step:
                self._guard("output_grads capture", lambda: self.publish(
                    call, "output_grads", self._unscaled(grad) if share is None else self._unscaled(grad) * share,
                    phase="train"))

        return hook

    def _grad_hook(self, layer: str, topic: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = distributed.local_shard(param.grad)  # FSDP2 hands its hooks DTensor gradients
            if not self.closed and grad is not None and id(param) not in self._not_counted and self.wants(topic):
                self._guard(f"{topic} capture", lambda: self.publish(layer, topic, self._unscaled(grad), phase="train"))

        return hook

    # -- GradScaler (sonde.probe.torch_scaler calls these) -----------------------------------------
    def loss_scaled(self, scaler: Any, scale: torch.Tensor) -> None:
        if not self.closed:
            self._loss_scale = scale

    def scaler_step_begins(self, scaler: Any, optimizer: Any) -> None:
        self._steps_before_scaler = self._optimizer_steps

    def scaler_step_ended(self, scaler: Any, optimizer: Any) -> None:
        def run() -> None:
            if (self.optimizer is None or self.closed or self._steps_before_scaler != self._optimizer_steps
                    or unwrap_optimizer(optimizer) is not self.optimizer):
                return
            self._skipped_step(scaler)

        self._guard("skipped-step capture", run)

    def _skipped_step(self, scaler: Any) -> None:
        """The scaler found inf/NaN gradients and did not call the optimizer: the step happened
        with updates of exactly zero, and an alert says so."""
        self.begin_optimizer_step()
        with torch.no_grad():
            self._publish_params(grads=False, snapshot=True)
            self.param_publisher.after_step(torch.Tensor.detach)  # unchanged parameters: zero updates
        scale = float(scaler._scale)  # a skip is rare, and the scaler has just read its flags anyway
        alert = Record(self.run, self.step, "train", NETWORK, "weight_updates", "alert", 1.0, message=(
            f"optimizer step skipped at step {self.step}: the GradScaler found inf/NaN in the gradients of the "
            f"loss scaled by {scale:g} (fp16 overflow), so no parameter changed; update() lowers the scale "
            "and training goes on (frequent skips after the first steps mean the loss or gradients overflow "
            "fp16 even unscaled: consider bf16)"))
        self._log_alerts([alert])
        self._emit([alert])
        self.optimizer_stepped()

    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        self._optimizer_steps += 1

        def run() -> None:
            self.begin_optimizer_step()
            with torch.no_grad():
                self._publish_params(grads=True, snapshot=True)

        # ``args`` are step's own: (optimizer, closure?)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not callable(closure):
            self._guard("optimizer pre-step capture", run)
            return None
        # ``step(closure)`` (Lightning always, LBFGS) runs the forward and backward inside the step,
        # after this hook: the gradients the step consumes exist only once the closure has run. The
        # capture runs then, once (LBFGS calls the closure again after moving the weights).
        done = False

        def closure_then_capture() -> Any:
            nonlocal done
            loss = closure()
            if not done:
                done = True
                self._guard("optimizer pre-step capture", run)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_capture}
        return (args[0], closure_then_capture, *args[2:]), kwargs

    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        def run() -> None:
            with torch.no_grad():
                self.param_publisher.after_step(torch.Tensor.detach)

        self._guard("weight update capture", run)
        self.optimizer_stepped()
