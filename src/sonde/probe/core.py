"""The framework-independent half of a probe: run, bus, sinks, steps and phases.

A framework adapter (``probe/torch.py`` is the reference) finds layers, installs hooks and
calls :meth:`Probe.publish`; this class decides which step a capture belongs to, when a step
is finished, and where the Records go.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from sonde.bus import Bus
from sonde.errors import ConfigError, LayerFilterError, ProbeError
from sonde.metrics.base import Metric
from sonde.metrics.registry import resolve_metrics
from sonde.probe.heap import HeapChurnCheck
from sonde.records import NETWORK, Record
from sonde.schedules import Schedule, as_schedule
from sonde.sinks import LayerInfo, RunInfo, Sink, SinkRunner, resolve_sinks
from sonde.topics import STEP_TOPICS, TOPICS
from sonde.worker import Worker

__all__ = ["Probe", "choose_layers", "deepest_owners", "guarded", "not_a_module", "shared_tensor"]

log = logging.getLogger("sonde")


def choose_layers(named: Sequence[tuple[str, Any, int, bool, bool]], layers: Any, depth: int | None,
                  model_name: str) -> dict[str, Any]:
    """The layers to probe, by name, in model order: the one rule of every adapter.

    ``named``: ``(name, layer, level, is_leaf, owns_parameters)`` for every layer, level 1 for the
    root's children (level 0, the root itself, only where the framework lets it own parameters).
    ``depth=None``: leaves and layers owning parameters of their own; ``depth=k``: layers k levels
    down, plus shallower leaves so that no branch is dropped. ``layers`` (names, globs or a
    callable ``(name, layer) -> bool``) filters those; given without ``depth`` it may name any
    layer, leaf or not.
    """
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"depth= expects None or an int >= 1, got {depth!r}")
    if depth is None and layers is not None:
        candidates = [(n, m) for n, m, level, _, owns in named if level > 0 or owns]
    elif depth is None:
        candidates = [(n, m) for n, m, _, leaf, owns in named if leaf or owns]
    else:
        candidates = [(n, m) for n, m, level, leaf, _ in named if level == depth or (level < depth and leaf)]
    if layers is None:
        chosen = candidates
    elif callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"layers= expects a callable or a list of names/globs, got {layers!r}")
        chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        examples = ", ".join(repr(n) for n, _ in candidates[:8]) or "(the model has no submodules)"
        raise LayerFilterError(f"layer filter {layers!r} (depth={depth}) matched no layer of {model_name}; "
                               f"names look like {examples}")
    return dict(chosen)


def deepest_owners(layers: dict[str, Any], held: Callable[[Any], Iterable[Any]]) -> dict[str, list[Any]]:
    """Each parameter (``held(layer)``: all a layer holds, its sublayers' included) goes to the
    deepest probed layer that holds it; a layer's depth is the dots in its name."""
    owners: dict[str, list[Any]] = {}
    taken: set[int] = set()
    for name in sorted(layers, key=lambda n: -n.count(".")):
        for param in held(layers[name]):
            if id(param) not in taken:
                taken.add(id(param))
                owners.setdefault(name, []).append(param)
    return owners


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
        "sonde.mxnet.probe(net, trainer=...); the Hugging Face and Lightning trainers take "
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
        *,
        model_name: str,
        run: str | None,
        store: Any,
        server: str | None,
        metrics: Sequence[str | Metric] | None,
        topics: Sequence[str] | None,
        every: int | Schedule,
        sinks: Sequence[str | Sink] | None,
        resume: bool,
        layers: list[LayerInfo],
        config: dict[str, Any],
    ) -> None:
        remote = None
        if server is not None:  # the server stores the Records instead of a local store
            from sonde.sinks.remote import RemoteSink

            remote, store = (server if isinstance(server, RemoteSink) else RemoteSink(server)), None
        if topics is not None:
            unknown = [t for t in topics if t not in TOPICS]
            if unknown or isinstance(topics, str):
                raise ConfigError(f"unknown topic(s) {unknown or topics!r}; topics are: {', '.join(TOPICS)}")
        self.schedule = as_schedule(every)
        self.metrics = resolve_metrics(metrics)
        sink_list = resolve_sinks(sinks)
        if remote is not None:
            sink_list.insert(0, remote)
        if any(m.name == "server" for m in self.metrics):  # ServerMetric: tensors shipped to the evaluator
            from sonde.server.api.tensors import bind_server_metrics

            bind_server_metrics(self.metrics, sink_list)
        if store is not None:
            from sonde.sinks.store import StoreSink
            from sonde.store import Store, open_store

            store_obj = store if isinstance(store, Store) else open_store(store)
            if run is None:
                run = store_obj.unique_run_name(model_name.lower())
            sink_list.insert(0, StoreSink(store_obj))
        if run is None:
            run = f"{model_name.lower()}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run = run
        self.info = RunInfo(
            name=run, model=model_name, framework=self.framework, config=config, layers=layers, resume=resume
        )
        self._runners: list[SinkRunner] = []
        try:
            for sink in sink_list:
                sink.open(self.info)  # on this thread: a bad path fails here, not at step 1000
                self._runners.append(SinkRunner(sink))
        except Exception:
            for runner in self._runners:
                runner.close("failed")
            raise
        self.bus = Bus(run, self.metrics, topics=TOPICS if topics is None else topics, schedule=self.schedule)
        self.bus.layer_types = {info.name: info.type for info in layers}
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

    # -- steps -------------------------------------------------------------------------------
    def wants(self, topic: str, phase: str = "train") -> bool:
        return not self.closed and self.bus.wants(topic, self.eval_step if phase == "eval" else self.step, phase)

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

    steps_on_optimizer = False

    def optimizer_stepped(self) -> None:
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
        """Send Records to every sink (from the training thread or the worker), alerts added."""
        if records:
            with self._emit_lock:
                if self.bus.watchers:
                    records = records + self.bus.watch(records)
                for runner in self._runners:
                    runner.submit(records)

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

