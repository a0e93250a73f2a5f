"""Building a probed model's graph at its first forward pass, off the training thread.

The probe installs :meth:`GraphJob.on_forward` as a forward pre-hook of the model. At the first
forward it keeps references to the call's arguments (no copy) and starts a daemon thread that
traces the model with :func:`~sonde.graph.extract.trace` (meta device first) and hands the JSON
dict to every sink runner (:meth:`SinkRunner.submit_graph`, then :meth:`~sonde.sinks.Sink.graph`
on the sink's thread). The
hook then removes itself. A graph that cannot be built is logged once and never reaches
training; the probe's ``close`` waits a bounded time for a trace still running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sonde.graph.extract import trace
from sonde.sinks.base import SinkRunner

__all__ = ["GraphJob"]

log = logging.getLogger("sonde")


class GraphJob:
    """Traces ``model`` once, on a background thread, at its first forward.

    Args:
        model: the probed module.
        runners: the probe's sink runners; each gets :meth:`Graph.to_dict` when the graph is ready.

    Example:
        >>> job = GraphJob(model, probe._runners)                      # doctest: +SKIP
        >>> handle = model.register_forward_pre_hook(job.on_forward, with_kwargs=True)  # doctest: +SKIP
        >>> job.handle = handle                                        # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, runners: Sequence[SinkRunner]) -> None:
        self.model = model
        self.runners = runners
        self.handle: Any = None
        self.graph: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def on_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook (``with_kwargs=True``): start the trace once, then remove the hook.
        Dynamo tracing a compiled model's forward traces it into nothing (it runs at an eager forward)."""
        if torch.compiler.is_compiling():
            return
        if getattr(module.forward, "__qualname__", "").startswith("_ForwardRedirection."):
            # Not the model's forward but Lightning's redirect: its DDP strategy calls the module
            # with ``training_step``'s arguments through a forward patched on the instance, and the
            # module's own forward (``self(x)`` in ``training_step``) comes next.
            return
        try:
            if self._thread is not None:
                return
            if self.handle is not None:
                self.handle.remove()
            self._thread = threading.Thread(target=self._build, args=(tuple(args), dict(kwargs)),
                                            name="sonde-graph", daemon=True)
            self._thread.start()
        except Exception as exc:  # noqa: BLE001 - monitoring must never break training
            log.warning("sonde: could not start building the model graph (training goes on): %s", exc)

    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self.graph = trace(self.model, args, kwargs, background=True).to_dict()
        except Exception as exc:  # noqa: BLE001 - the run records everything else
            self.error = exc
            log.warning("sonde: the model graph could not be built; the run records everything else: %s", exc)
            return
        try:
            for runner in self.runners:
                runner.submit_graph(self.graph)
        except Exception as exc:  # noqa: BLE001
            log.warning("sonde: the model graph could not be handed to the sinks: %s", exc)

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait for a running trace; True when none is running any more."""
        if self.handle is not None:
            self.handle.remove()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("sonde: the model graph was still being built after %.0f s; the run is closed without it",
                        timeout)
            return False
        return True
