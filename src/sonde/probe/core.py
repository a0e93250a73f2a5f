"""The framework-independent half of a probe: run, bus, sinks, steps and phases.

A framework adapter (``probe/torch.py`` is the reference) finds layers, installs hooks and
calls :meth:`Probe.publish`, with the adapter kit (:mod:`sonde.probe.kit`) for what every
adapter does alike; this class holds the step protocol (:meth:`Probe.begin_train_forward`,
:meth:`Probe.begin_optimizer_step`, :meth:`Probe.optimizer_stepped`, :meth:`Probe.count_steps`):
which step a capture belongs to, when a step is finished, and where the Records go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sonde.bus import Bus
from sonde.errors import ConfigError, ProbeError
from sonde.metrics.registry import resolve_metrics
from sonde.probe import distributed
from sonde.probe.heap import HeapChurnCheck
from sonde.probe.kit import KEYWORDS, ProbeOptions
from sonde.records import NETWORK, Record
from sonde.run_config import check_config
from sonde.run_info import LayerInfo, RunInfo
from sonde.run_name import check_run_name
from sonde.schedules import as_schedule
from sonde.sinks import SinkRunner, resolve_sinks
from sonde.topics import STEP_TOPICS, TOPICS
from sonde.worker import Worker

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["Probe", "guarded", "not_a_module", "shared_tensor"]

log = logging.getLogger("sonde")


def guarded(warned: set[str], where: str, fn: Callable[[], Any]) -> None:
    """Run monitoring code; a failure is logged loudly, once per ``where`` (noted in ``warned``),
    and never reaches training."""
    try:
        fn()
    except Exception as exc:
        if where not in warned:
            warned.add(where)
            log.exception("sonde: %s failed; training goes on without it: %s", where, exc)


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
        model_name = type(model).__name__
        run, store, server = options.get("run"), options.get("store", "sonde.db"), options.get("server")
        metrics, topics, sinks = options.get("metrics"), options.get("topics"), options.get("sinks")
        every = options.get("every", 1)
        resume = options.get("resume", False)
        config = {"every": repr(every), "depth": options.get("depth"), "optimizer": optimizer, **(config or {})}
        check_config(config)  # the bound the store and the server hold a run's config to, before any sink opens
        if run is not None:
            check_run_name(run)  # a name the server cannot address would lose every Record sent to it
        self.layers = probed
        infos = [LayerInfo(name, type(layer).__name__, {p: list(s) for p, s in shapes.get(name, {}).items()})
                 for name, layer in probed.items()]
        if topics is not None:
            unknown = [t for t in topics if t not in TOPICS]
            if unknown or isinstance(topics, str):
                raise ConfigError(f"unknown topic(s) {unknown or topics!r}; topics are: {', '.join(TOPICS)}")
        self.schedule = as_schedule(every)
        self.metrics = resolve_metrics(metrics)
        self._runners: list[SinkRunner] = []
        # Under torch.distributed every rank captures; rank 0 alone names the run and writes it.
        self.ranks = distributed.world()
        self.rank = 0 if self.ranks is None else self.ranks[0]

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
        self.bus = Bus(run, self.metrics, topics=TOPICS if topics is None else topics, schedule=self.schedule)
        self.bus.layer_types = {info.name: info.type for info in infos}
        if any(m.offload for m in self.metrics):
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

    # -- steps -------------------------------------------------------------------------------
    def wants(self, topic: str, phase: str = "train") -> bool:
        step = self.eval_step if phase == "eval" else self.step
        return not (self.closed or self.switched_off) and self.bus.wants(topic, step, phase)

    def _recorded(self, step: int) -> bool:
        """Whether any metric records at train ``step`` (the steps the ranks merge at)."""
        return any(self.bus.scheduled(m, step) for templates in self.bus.templates.values() for m in templates)

    def _switch_off(self) -> None:
        """Stop monitoring (every rank does it at the same step, see :mod:`sonde.probe.distributed`)."""
        self.switched_off = True

    @property
    def eval_step(self) -> int:
        """Step an evaluation pass is filed under: the step whose weights it sees."""
        return self.step + 1 if self._step_closed else self.step

    def begin_train_forward(self) -> bool:
        """Called at each train-mode forward of the root; returns True when a new step began."""
        self.finish_eval()
        if self._step_started and (self._step_closed or not self.steps_on_optimizer):
            self.finish_step()
            self.step += 1
            self._step_closed = False
            self._step_started = True
            self._heap.step()
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
        forward of the probed model ran in it (a trainer's closure runs it inside the step)."""
        self._step_started = True

    def optimizer_stepped(self) -> None:
        """The optimizer stepped: the next train forward starts a new step."""
        self._step_started = True
        self._step_closed = True

    def finish_step(self, final: bool = False) -> None:
        self._emit(self.bus.flush("train", self.step, final=final))

    def finish_eval(self) -> None:
        if self.bus.pending("eval"):
            self._emit(self.bus.flush("eval", self.eval_step))

    def publish(self, layer: str, topic: str, tensor: Any, *, phase: str, step: int | None = None, **kw: Any) -> None:
        if step is None:
            step = self.eval_step if phase == "eval" else self.step
        self.bus.publish(layer, topic, tensor, phase=phase, step=step, **kw)

    def _emit(self, records: list[Record]) -> None:
        """Send Records to every sink (from the training thread or the worker), alerts added.
        Under torch.distributed only rank 0 emits (its Records are the merged ones)."""
        if records and self.rank == 0:
            with self._emit_lock:
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
            self._step_started = True
        labels = values.get("labels")
        for topic in ("loss", "outputs"):
            value = values.get(topic)
            if value is None or not self.wants(topic, phase):
                continue
            tensor = self.as_tensor(value, topic)
            self.publish(NETWORK, topic, tensor, phase=phase, labels=labels if topic == "outputs" else None)

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
        try:
            self.finish_eval()
            if self._step_started or self.bus.accumulating():
                self.finish_step(final=True)
            self.bus.end_run()
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

