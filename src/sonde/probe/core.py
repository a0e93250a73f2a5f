"""The framework-independent half of a probe: run, bus, sinks, steps and phases.

A framework adapter (``probe/torch.py`` is the reference) finds layers, installs hooks and
calls :meth:`Probe.publish`, with the adapter kit (:mod:`sonde.probe.kit`) for what every
adapter does alike; this class holds the step protocol (:meth:`Probe.begin_train_forward`,
:meth:`Probe.begin_optimizer_step`, :meth:`Probe.optimizer_stepped`, :meth:`Probe.count_steps`):
which step a capture belongs to, when a step is finished, and where the Records go.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch

from sonde.budget import NOT_FINITE, SCHEDULE_TOPIC, Budget, PlanState, TroubleWatch
from sonde.bus import Bus
from sonde.errors import ConfigError, ProbeError
from sonde.metrics.base import Capture, Metric
from sonde.metrics.registry import resolve_metrics
from sonde.probe import distributed, rank_checks
from sonde.probe.heap import HeapChurnCheck
from sonde.probe.kit import KEYWORDS, ProbeOptions
from sonde.records import NETWORK, Record
from sonde.run_config import check_config
from sonde.run_info import LayerInfo, RunInfo, user_class
from sonde.run_name import check_run_name
from sonde.schedules import Schedule, as_schedule, every
from sonde.sinks import SinkRunner, resolve_sinks
from sonde.topics import GRAD_TOPICS, STEP_TOPICS, TOPICS
from sonde.worker import Worker

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["Probe", "guarded", "not_a_module", "shared_tensor"]

log = logging.getLogger("sonde")

_NOTHING = torch.zeros(())  # what the budget's proposal is "captured" from


def guarded(warned: set[str], where: str, fn: Callable[[], Any]) -> None:
    """Run monitoring code; a failure is logged loudly, once per ``where`` (noted in ``warned``),
    never reaches training, and switches that part off: ``fn`` is not called again for ``where``."""
    if where in warned:
        return  # that part of monitoring is switched off
    try:
        fn()
    except Exception as exc:
        warned.add(where)
        log.exception("sonde: %s failed; training goes on without it (this part of monitoring is off for the "
                      "rest of the run; the traceback below says why: leave the layer, topic or metric out, "
                      "or report it): %s", where, exc)


def shared_tensor(array: Any) -> torch.Tensor:
    """Another framework's array as a torch tensor: its memory shared through DLPack (no copy),
    else copied through numpy (a device or a dtype torch cannot share; ml_dtypes' float8 and the
    like become float32)."""
    try:
        return torch.from_dlpack(array)
    except Exception:  # noqa: BLE001 - anything DLPack cannot hand over is copied
        copy = np.array(array)
        if copy.dtype.kind == "f" and copy.dtype not in (np.float16, np.float32, np.float64):
            copy = copy.astype(np.float32)
        return torch.from_numpy(copy)


def not_a_module(model: Any) -> ProbeError:
    """The error for a model sonde has no adapter for."""
    return ProbeError(
        f"sonde.probe expects a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}; "
        "Keras models are probed while they fit: model.fit(..., callbacks=[sonde.keras.SondeCallback()]); "
        "Flax NNX models take sonde.jax.probe(model, optimizer=...), Gluon blocks "
        "sonde.mxnet.probe(net, trainer=...), TF1-style sessions "
        "sonde.tensorflow.probe_session(session, loss=...); the Hugging Face and Lightning trainers take "
        "sonde.transformers.SondeCallback and sonde.lightning.SondeCallback"
    )


class Probe:
    """A probe attached to one model for one run. Use it as a context manager.

    Steps are 0-based. A train step is *finished* when the next train step starts or the probe
    closes, so values logged right after ``optimizer.step()`` still belong to the step that
    produced them. Evaluation passes (model in eval mode or gradients disabled) are recorded in
    phase ``eval`` at the step whose weights they used, all eval batches merged into one value.
    """

    framework = ""

    def __init__(
        self,
        model: Any,
        probed: dict[str, Any],
        shapes: dict[str, dict[str, Sequence[int]]],
        /,
        *,
        optimizer: str | None,
        config: dict[str, Any] | None = None,
        **options: Unpack[ProbeOptions],
    ) -> None:
        """What an adapter hands over once it has chosen its layers (before it hooks anything).

        Args:
            model: the model (its class name names the run).
            probed: the probed layers by name (:func:`~sonde.probe.kit.choose_layers`).
            shapes: each probed layer's parameters: their shapes by name.
            optimizer: the optimizer's class name (None: none given), for the run's config.
            config: more of the run's config.
            **options: :class:`~sonde.probe.kit.ProbeOptions`.
        """
        unknown = sorted(set(options) - set(KEYWORDS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"it takes {', '.join(KEYWORDS)}")
        model_name = user_class(type(model)).__name__  # FSDP2's FSDPSequential is the user's Sequential
        run, store, server = options.get("run"), options.get("store", "sonde.db"), options.get("server")
        metrics, topics, sinks = options.get("metrics"), options.get("topics"), options.get("sinks")
        every_option = options.get("every")
        fraction, max_interval = options.get("budget", 0.05), options.get("max_interval", 100)
        budget = None if every_option is not None else Budget(fraction, max_interval)
        resume = options.get("resume", False)
        chosen = repr(every_option) if budget is None else f"budget({fraction:g}, max_interval={max_interval})"
        config = {"every": chosen, "depth": options.get("depth"), "optimizer": optimizer, **(config or {})}
        check_config(config)  # the bound the store and the server hold a run's config to, before any sink opens
        if run is not None:
            check_run_name(run)  # a name the server cannot address would lose every Record sent to it
        self.layers = probed
        infos = [LayerInfo(name, user_class(type(layer)).__name__,
                           {p: list(s) for p, s in shapes.get(name, {}).items()}) for name, layer in probed.items()]
        if topics is not None:
            unknown = [t for t in topics if t not in TOPICS]
            if unknown or isinstance(topics, str):
                raise ConfigError(f"unknown topic(s) {unknown or topics!r}; topics are: {', '.join(TOPICS)}")
        #: What ``every=`` says (every step under the budget, which spaces the metrics itself).
        self.every: Schedule = as_schedule(every(1) if every_option is None else every_option)
        self.metrics = resolve_metrics(metrics)
        self._runners: list[SinkRunner] = []
        # Under torch.distributed every rank captures; rank 0 alone names the run and writes it.
        self.ranks = distributed.world()
        self.rank = 0 if self.ranks is None else self.ranks[0]
        per_rank = bool(options.get("per_rank", False)) and self.ranks is not None
        if per_rank:  # each rank's own activations are layers of their own: <layer>@rank<r>
            assert self.ranks is not None
            infos += [LayerInfo(rank_checks.rank_layer(info.name, r), info.type, {})
                      for r in range(self.ranks[1]) for info in list(infos)]

        def start() -> str:
            """Open the sinks (the store, the remote connection) and name the run; returns its name."""
            remote, store_arg = None, store
            if server is not None:  # the server stores the Records instead of a local store
                from sonde.sinks.remote import RemoteSink

                remote, store_arg = (server if isinstance(server, RemoteSink) else RemoteSink(server)), None
            sink_list = resolve_sinks(sinks)
            if remote is not None:
                sink_list.insert(0, remote)
            if any(m.name == "server" for m in self.metrics):  # ServerMetric: tensors shipped to the evaluator
                from sonde.sinks.remote import bind_server_metrics  # httpx and the outbox only for remote probes

                bind_server_metrics(self.metrics, sink_list)
            name = run
            if store_arg is not None:
                from sonde.sinks.store import StoreSink
                from sonde.store import Store, open_store

                store_obj = store_arg if isinstance(store_arg, Store) else open_store(store_arg)
                if name is None:
                    name = store_obj.unique_run_name(model_name.lower())
                sink_list.insert(0, StoreSink(store_obj))
            if name is None:
                name = f"{model_name.lower()}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.info = RunInfo(
                name=name, model=model_name, framework=self.framework, config=config, layers=infos, resume=resume
            )
            try:
                for sink in sink_list:
                    sink.open(self.info)  # on this thread: a bad path fails here, not at step 1000
                    self._runners.append(SinkRunner(sink))
            except Exception:
                for runner in self._runners:
                    runner.close("failed")
                raise
            return name

        if self.ranks is None:
            run = start()
        else:
            run = distributed.agree(self.rank, start)
            if self.rank != 0:
                self.info = RunInfo(
                    name=run, model=model_name, framework=self.framework, config=config, layers=infos, resume=resume
                )
        self.run = run
        self.bus = Bus(run, self.metrics, topics=TOPICS if topics is None else topics, schedule=self.every)
        self.bus.layer_types = {info.name: info.type for info in infos}
        #: The overhead budget (:mod:`sonde.budget`), when ``every=`` is not given.
        self.budget = budget
        #: NaN/Inf and spikes of the loss and of the gradient norm, by what is watched (budget only).
        self._troubles: dict[str, TroubleWatch] | None = None
        if budget is not None:
            self._budget_plan = PlanState(budget)
            # The gradient norm moves more from step to step than the loss (the benchmark MLP's rose
            # 2-3x between recorded steps): its spike is at least 4x the recent median (10 x 30% above).
            self._troubles = {"loss": TroubleWatch(),
                              "gradient norm": TroubleWatch(min_history=4, floor=0.3)}
            self.share_budget(self.bus)
        # The worker runs offloaded computes, and finishes the steps recorded on a CUDA device (their
        # partial sums arrive by an asynchronous copy: sonde.metrics.transfer).
        if any(m.offload for m in self.metrics) or torch.cuda.is_available():
            self.bus.worker = Worker(self._emit, name=f"sonde-worker-{run}")
        self.step = self.info.first_step
        self._step_started = False  # a train forward (or log) happened in the current step
        self._step_closed = False  # the optimizer stepped: the next train forward starts a new step
        self.closed = False
        # The training thread and the worker both emit: alert watchers keep state, and each sink
        # should see one thread's batch whole before the other's.
        self._emit_lock = threading.Lock()
        self._heap = HeapChurnCheck()
        self._warned: set[str] = set()  # monitoring failures already reported (see guarded)
        self.switched_off = False  # monitoring stopped on every rank (a failure on one of them)
        if self.ranks is not None:
            self.bus.engine.merge_ranks = distributed.RankMerge(*self.ranks, recorded=self._recorded,
                                                                switch_off=self._switch_off)
            if per_rank:
                self.bus.engine.merge_ranks.checks.append(rank_checks.PerRankView(run))

    # -- steps -------------------------------------------------------------------------------
    def wants(self, topic: str, phase: str = "train") -> bool:
        step = self.eval_step if phase == "eval" else self.step
        return not (self.closed or self.switched_off) and self.bus.wants(topic, step, phase)

    def _recorded(self, step: int) -> bool:
        """Whether any metric records at train ``step`` (the steps the ranks merge at), the network-wide
        values the budget records every step (``loss``) left aside. Answered for step k + 1 at the end
        of step k, the answer never changes."""
        free = self.budget.free if self.budget is not None else ()
        return any(self.bus.scheduled(m, step) for templates in self.bus.templates.values() for m in templates
                   if m.name not in free)

    @property
    def step_schedule(self) -> Schedule:
        """The steps the probe records (``every=``, or the budget's choice): for side passes."""
        return self.every if self.budget is None else self._recorded

    def share_budget(self, bus: Bus) -> None:
        """Let the budget space the metrics of ``bus`` too (the probe's own, or a side pass's), and
        hear what its offloaded metrics cost."""
        budget = self.budget
        if budget is None:
            return
        bus.budget = budget
        by_name: dict[str, list[Metric]] = {}  # the budget spaces metrics by name (ServerMetrics share one)
        for metric in {id(m): m for templates in bus.templates.values() for m in templates}.values():
            if metric.schedule is None:
                by_name.setdefault(metric.name, []).append(metric)
        for name, metrics in by_name.items():
            # network-wide values cost a scalar: every step, except where recording means a collective
            free = self.ranks is None and all(set(m.topics) <= set(STEP_TOPICS) for m in metrics)
            budget.register(name, expensive=any(m.offload for m in metrics), free=free)

    @overload
    def schedule(self) -> dict[str, int]: ...
    @overload
    def schedule(self, step: int) -> bool: ...
    def schedule(self, step: int | None = None) -> dict[str, int] | bool:
        """How often each metric records, in steps, by metric name: the budget's choice now (see
        :mod:`sonde.budget`), or what ``every=N`` and the metrics' own ``every=N`` say (schedules
        that are not a fixed interval, such as ``log_spaced``, are left out). With ``step``: whether
        the probe records that step (:attr:`step_schedule`).

        Example:
            ``p.schedule()`` → ``{'histogram': 4, 'loss': 1, 'saturation': 16, 'stats': 4, ...}``
        """
        if step is not None:
            return bool(self.step_schedule(step))
        out = self.budget.schedule() if self.budget is not None else {}
        for templates in self.bus.templates.values():
            for metric in templates:
                schedule = metric.schedule or (None if self.budget is not None else self.every)
                if isinstance(schedule, every):
                    out[metric.name] = schedule.n
        return dict(sorted(out.items()))

    def _switch_off(self) -> None:
        """Stop monitoring (every rank does it at the same step, see :mod:`sonde.probe.distributed`)."""
        self.switched_off = True

    @property
    def eval_step(self) -> int:
        """Step an evaluation pass is filed under: the step whose weights it sees."""
        return self.step + 1 if self._step_closed else self.step

    def begin_train_forward(self) -> bool:
        """Called at each train-mode forward of the root; returns True when a new step began."""
        try:
            self.finish_eval()
        except Exception as exc:
            self._abandon_merge(exc)
            raise
        if self._step_started and (self._step_closed or not self.steps_on_optimizer):
            self.finish_step()
            self.step += 1
            self._step_closed = False
            self._step_started = True
            self._guard("the heap's bookkeeping", self._heap.step)  # after the merge (see finish_step)
            return True
        new = not self._step_started
        self._step_started = True
        return new

    #: Whether steps are the optimizer's (set by :meth:`count_steps`); else each train forward is one.
    steps_on_optimizer = False

    def count_steps(self, by_optimizer: bool, *, keyword: str = "optimizer", example: str = "opt",
                    lost: str = "weights, gradients and updates", passes: str = "training forward passes") -> None:
        """Steps are the optimizer's when the adapter hooks one (``by_optimizer``); without one each
        training forward pass is a step, and a warning says what cannot be recorded (``lost``)
        when the topics ask for updates, and which keyword (``keyword=example``) would give it."""
        self.steps_on_optimizer = by_optimizer
        if not by_optimizer and (self.bus.topics & {"weight_updates", "bias_updates"}):
            log.warning("sonde: no %s= given, so %s are unavailable and steps are counted by %s; pass %s=%s "
                        "to record them", keyword, lost, passes, keyword, example)

    def begin_optimizer_step(self) -> None:
        """The optimizer is about to step: the current step has begun, whether or not a train
        forward of the probed model ran in it (a trainer's closure runs it inside the step).

        A step after the previous one with no train forward seen between them is the next step's:
        a compiled model's forward runs none of the probe's hooks on unrecorded steps (the train
        ``log`` of such a step is filed as the loop's recorded steps showed, see ``_file_train_log``)."""
        if self._step_closed:
            self.begin_train_forward()
        self._step_started = True

    def optimizer_stepped(self) -> None:
        """The optimizer stepped: the next train forward starts a new step."""
        self._step_started = True
        self._step_closed = True

    def finish_step(self, final: bool = False) -> None:
        budget = self.budget
        merger = self.bus.engine.merge_ranks
        try:
            if budget is None:
                records = self.bus.flush("train", self.step, final=final)
                # After the merge across ranks, a failure switches that part off (logged once) and the
                # step goes on: raised, it would stop this rank's step bookkeeping, and the other
                # ranks would wait for it at the next merge until the process group's timeout.
                self._guard("recording a step", lambda: self._emit(records))
            else:
                self._finish_budgeted_step(budget, final)
        except Exception as exc:
            self._abandon_merge(exc, final)
            raise
        if isinstance(merger, distributed.RankMerge) and merger.records:
            # What the checks across ranks found (desync alerts, per-rank values): not watched by alerts.
            records, merger.records = merger.records, []
            if self.rank == 0:
                self._log_alerts([r for r in records if r.metric == "alert"])
                with self._emit_lock:
                    for runner in self._runners:
                        runner.submit(records)

    def _abandon_merge(self, exc: Exception, final: bool = False) -> None:
        """This rank's flush failed before the current step's merge: the other ranks may be waiting
        in it, so meet them there with a failure flag (every rank then switches monitoring off)."""
        merger = self.bus.engine.merge_ranks
        if isinstance(merger, distributed.RankMerge):
            merger.abandon(self.step, final, f"{type(exc).__name__}: {exc}")

    def _finish_budgeted_step(self, budget: Budget, final: bool) -> None:
        """The flush, timed for the budget; at a recorded step where a decision is due, this rank's
        proposal joins the flush (its merge across ranks, under torch.distributed, is the decision)."""
        start, step = budget.clock(), self.step
        if budget.due(step) and budget.recorded(step):
            capture = Capture(_NOTHING, layer=NETWORK, topic=SCHEDULE_TOPIC, step=step)
            self.bus.engine.update((NETWORK, SCHEDULE_TOPIC), [self._budget_plan], capture)
        records = self.bus.flush("train", step, final=final)
        # After the merge: a failure switches that part off and the step goes on (see finish_step).
        self._guard("recording a step", lambda: self._emit(records + budget.settled_records(self.run, step)))
        budget.add_own_time(budget.clock() - start)
        self._guard("the overhead budget's measurements", lambda: budget.step_ended(step))

    def finish_eval(self) -> None:
        """Record the evaluation pass that ran since the last flush (under torch.distributed its
        merge across ranks is made here, by every rank that ran a batch of it)."""
        if not self.bus.pending("eval"):
            return
        merger = self.bus.engine.merge_ranks
        entered = merger.eval_merges if isinstance(merger, distributed.RankMerge) else 0
        try:
            self._emit(self.bus.flush("eval", self.eval_step))
        except Exception as exc:
            if isinstance(merger, distributed.RankMerge):  # the other ranks may be waiting in the pass's merge
                merger.abandon_eval(entered, self.eval_step, f"{type(exc).__name__}: {exc}")
            raise

    def publish(self, layer: str, topic: str, tensor: Any, *, phase: str, step: int | None = None, **kw: Any) -> None:
        if step is None:
            step = self.eval_step if phase == "eval" else self.step
        budget = self.budget
        if budget is None:
            self.bus.publish(layer, topic, tensor, phase=phase, step=step, **kw)
            return
        start = budget.clock()
        self.bus.publish(layer, topic, tensor, phase=phase, step=step, **kw)
        budget.add_own_time(budget.clock() - start)

    def _emit(self, records: list[Record]) -> None:
        """Send Records to every sink (from the training thread or the worker), alerts added.
        Under torch.distributed only rank 0 emits (its Records are the merged ones)."""
        if records and self.rank == 0:
            with self._emit_lock:
                if self._troubles is not None:
                    found: list[Record] = []
                    self._guard("gradient check", lambda: found.extend(self._check_gradients(records)))
                    records = records + found
                if self.bus.watchers:
                    alerts = self.bus.watch(records)
                    records = records + alerts
                    self._log_alerts(alerts)
                for runner in self._runners:
                    runner.submit(records)

    def _log_alerts(self, alerts: list[Record]) -> None:
        """Log each alert (logger ``sonde``, WARNING) unless a working sink shows it (the console
        sink prints an ALERT line): either way the user sees each alert once."""
        if any(runner.sink.shows_alerts and runner.failed is None for runner in self._runners):
            return
        for alert in alerts:
            log.warning("sonde: alert (%s): %s", alert.phase, alert.message)

    def _guard(self, where: str, fn: Callable[[], Any]) -> None:
        guarded(self._warned, where, fn)

    # -- user API ----------------------------------------------------------------------------
    def log(self, **values: Any) -> None:
        """Log per-step, network-wide values: ``loss``, ``labels`` and ``outputs``.

        Tensors stay on their device; nothing is read back here. ``labels`` with ``outputs``
        give ``train_accuracy``.

        Example:
            ``p.log(loss=loss, labels=y, outputs=out)``
        """
        unknown = sorted(set(values) - set(STEP_TOPICS))
        if unknown:
            raise ConfigError(f"Probe.log() takes {', '.join(STEP_TOPICS)}; got unexpected {', '.join(unknown)}")
        if self.closed:
            raise ConfigError("Probe.log() called after the probe closed; log inside the `with sonde.probe(...)` block")
        phase = self.current_phase()
        if phase == "train":
            self._file_train_log()
            loss = values.get("loss")
            if self._troubles is not None and loss is not None and not self.switched_off:
                self._guard("loss check", lambda: self._check_loss(loss))
        labels = values.get("labels")
        for topic in ("loss", "outputs"):
            value = values.get(topic)
            if value is None or not self.wants(topic, phase):
                continue
            tensor = self.as_tensor(value, topic)  # a value of the wrong kind raises (bad input)
            self._guard(f"{topic} capture", lambda t=topic, x=tensor: self.publish(  # type: ignore[misc]
                NETWORK, t, x, phase=phase, labels=labels if t == "outputs" else None))

    def _file_train_log(self) -> None:
        """Which step a train ``log`` belongs to. After the optimizer stepped and before the next train
        forward it is the step just stepped (``p.log`` after ``opt.step()``), unless this loop logs
        before its optimizer steps (seen at steps whose forward the probe saw) and no forward is seen
        any more (a compiled model's unrecorded steps): then the log opens the next step."""
        if not self._step_closed:
            if self._step_started:
                self._logs_before_step = True
        elif self._logs_before_step and not self._logs_after_step and self.forward_unseen():
            self.begin_train_forward()
        else:
            self._logs_after_step = True
        self._step_started = True

    #: Whether this loop logs before (after) its optimizer steps, learnt from the steps whose forward was seen.
    _logs_before_step = False
    _logs_after_step = False

    def forward_unseen(self) -> bool:
        """Whether the model's train forward may run without the probe seeing it (adapters override:
        a compiled torch model between recorded steps)."""
        return False

    def _check_loss(self, loss: Any) -> None:
        alert = self._check_trouble("loss", self.step, self.as_tensor(loss, "loss"), "loss")
        if alert is not None:
            self._log_alerts([alert])
            self._emit([alert])

    def _check_gradients(self, records: list[Record]) -> list[Record]:
        """NaN/Inf or a spike of the gradient norm at the recorded steps among ``records``: the norm of
        all parameters' gradients, from the per-layer ``norm`` of ``weight_grads`` and ``bias_grads``
        those steps already carry (nothing is computed for it; without that statistic, no check)."""
        squares: dict[int, float] = {}
        for record in records:
            if (record.phase == "train" and record.metric == "norm" and record.topic in GRAD_TOPICS
                    and record.is_scalar and not rank_checks.is_per_rank(record.layer)):
                squares[record.step] = squares.get(record.step, 0.0) + float(record.value) ** 2
        # NaN/Inf gradients are already the alert that names the layer they first appeared in
        # (sonde.metrics.alerts): the steps are recorded in full all the same, without a second alert.
        found = [self._check_trouble("gradient norm", step, torch.tensor(math.sqrt(total)), "weight_grads",
                                     alert_not_finite=not self.bus.watchers)
                 for step, total in sorted(squares.items())]
        alerts = [alert for alert in found if alert is not None]
        self._log_alerts(alerts)
        return alerts

    def _check_trouble(self, what: str, step: int, value: torch.Tensor, topic: str, *,
                       alert_not_finite: bool = True) -> Record | None:
        """NaN/Inf or a spike of the loss or the gradient norm (:class:`~sonde.budget.TroubleWatch`):
        the next steps are recorded in full, whatever the budget says, and an alert says so (for a
        NaN/Inf value only with ``alert_not_finite``). In one process from the next step nobody asked
        about; under torch.distributed from the step after the next recorded one, where every rank
        hears of it through the merge."""
        assert self._troubles is not None and self.budget is not None
        found = self._troubles[what].observe(step, value)
        if found is None:
            return None
        at, kind = found
        if self.ranks is None:
            first, end = self.budget.force(at + 1)
            which = f"steps {first}-{end - 1} are recorded in full"
        else:
            self.budget.trouble_seen = True
            which = f"the {self.budget.trouble_steps} steps after the next recorded one are recorded in full"
        if kind == NOT_FINITE and not alert_not_finite:
            return None
        return Record(self.run, at, "train", NETWORK, topic, "alert", 1.0, message=(
            f"{what} {kind} at step {at}: {which} (every metric of every layer, whatever the overhead budget)"))

    def current_phase(self) -> str:
        return "train"

    def as_tensor(self, value: Any, topic: str) -> torch.Tensor:
        """A logged value as a tensor: numbers, and other frameworks' arrays (:func:`shared_tensor`)."""
        if isinstance(value, (int, float)):
            return torch.tensor(float(value))
        try:
            return shared_tensor(value)
        except Exception as exc:
            raise ConfigError(f"Probe.log({topic}=...) expects a tensor, an array or a number, "
                              f"got {type(value).__name__}") from exc

    def end_epoch(self) -> None:
        """Mark the current step as the last of an epoch.

        Metrics configured with ``reset="epoch"`` compute a value at this step (whatever their
        ``compute_every`` says) and start the next epoch with fresh state.

        Example:
            ``for epoch in range(n): train_one_epoch(); p.end_epoch()``
        """
        if self.closed:
            raise ConfigError("Probe.end_epoch() called after the probe closed; call it inside the `with` block")
        self.bus.end_epoch()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every sink has written what was recorded so far (finished steps only),
        including values the background worker was still computing."""
        worker = self.bus.worker
        if worker is not None and not worker.drain(timeout):
            log.error("sonde: flush: the background worker is still computing after %.0f s", timeout)
        for runner in self._runners:
            runner.flush(timeout)

    def close(self, status: str = "finished", timeout: float = 60.0) -> None:
        """Record the last step, remove every hook, wait (at most ``timeout`` seconds) for values the
        background worker is computing, and close the sinks. Idempotent.

        State that accumulated since its last value (``compute_every``) is computed at the last step.
        """
        if self.closed:
            return
        merger = self.bus.engine.merge_ranks
        if isinstance(merger, distributed.RankMerge):
            merger.closing = True
            if status == "failed":
                merger.active = False  # leaving on an error: the other ranks are elsewhere, so no collective
        def finish() -> None:
            self.finish_eval()
            if self._step_started or self.bus.accumulating():
                self.finish_step(final=True)
            self.bus.end_run()

        try:
            self._guard("recording the last step", finish)  # leaving the `with` block never raises because of sonde
        finally:
            self.closed = True
            self.detach()
            if self.bus.worker is not None:
                self.bus.worker.close(timeout)
            self.bus.report_failures()  # a metric that kept failing is named again, with its count
            for runner in self._runners:
                runner.close(status)
            failed = [r.sink.name for r in self._runners if r.failed is not None]
            if failed:
                log.error("sonde: run %r finished with failed sink(s): %s (see errors above)", self.run, failed)

    def detach(self) -> None:
        """Remove the framework hooks (adapters override)."""

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close("failed" if exc_type is not None else "finished")

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            log.warning("sonde: probe for run %r was never closed; use `with sonde.probe(...)`", self.run)

