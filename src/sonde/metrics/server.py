"""Metrics run on the server: :class:`ServerMetric` (probe side) and :func:`metric_from_spec` (both ends).

A probe moves any registered metric off the training process by wrapping it::

    sonde.probe(model, server="http://127.0.0.1:8080",
                metrics=["mean", ServerMetric("histogram", bins=32, sample=256)])

On the probe, :class:`ServerMetric` only copies (the first ``sample`` rows of) each captured
tensor; at the end of the step the copy waits in its :class:`TensorShipper` until the remote
sink's sender thread pumps it out as a tensors payload (:mod:`sonde.wire.tensors`). The server's
evaluator runs the very same metric class on it, on the :class:`~sonde.metrics.engine.MetricEngine`
the probe uses, and stores the Records under the run, exactly as if computed in process. Nothing
here imports the server (nor FastAPI): the probe and the server share only :mod:`sonde.wire`.

Example:
    >>> metric_from_spec({"name": "histogram", "kwargs": {"bins": 8}}).bins
    8
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from sonde.errors import ConfigError
from sonde.metrics.base import Capture, Metric
from sonde.metrics.registry import registry
from sonde.wire.tensors import MARKS, Mark, TensorItem, encode_payload

__all__ = ["ServerMetric", "TensorShipper", "metric_from_spec"]

log = logging.getLogger("sonde")

#: ``send(body, batch_id, count)``: queues one tensors payload behind the run's Records (the remote sink).
Send = Callable[[bytes, str, int], None]


def metric_from_spec(spec: Any) -> Metric:
    """The configured metric a spec ``{"name": ..., "kwargs": {...}}`` describes; ValueError when it cannot be built."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}),
                                                                                            dict):
        raise ValueError(f"a metric spec is {{\"name\": str, \"kwargs\": object}}; got {spec!r:.80}")
    table = registry()
    cls = table.get(spec["name"])
    if cls is None:
        raise ValueError(f"unknown metric {spec['name']!r:.80}; registered metrics are: {', '.join(sorted(table))}")
    if cls.derived or cls.reads_topics:
        raise ValueError(f"metric {spec['name']!r} is computed from other metrics' Records, not from tensors")
    kwargs = spec.get("kwargs", {})
    cls.check_settings(**kwargs)  # the bounds the metric declares, before anything is built
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metric {spec['name']!r} cannot be built with {spec.get('kwargs')!r:.200}: {exc}") from exc


def _cat(a: Any, b: Any) -> np.ndarray:
    return np.concatenate([np.atleast_1d(a), np.atleast_1d(b)])


class TensorShipper:
    """Shared by a ServerMetric and its clones (``deepcopy`` keeps it); holds items until they are sent.

    :meth:`connect` gives it where payloads go (the remote sink's queue); :meth:`pump` is called
    by the sender thread (and at the sink's close) to hand waiting items over.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.items: deque[TensorItem | Mark] = deque()
        self.bytes = 0
        self.max_bytes = max_bytes
        self.dropped = 0
        self.lock = threading.Lock()
        # One pump at a time: the sender thread and the sink's close() both pump, and a batch popped
        # by one must reach the sink before the other can queue the run's end and close the outbox.
        self.pumping = threading.Lock()
        self.send: Send | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> TensorShipper:
        return self

    def connect(self, send: Send) -> None:
        """Where payloads go: ``send(body, batch_id, count)``."""
        self.send = send

    def ship(self, item: TensorItem) -> None:
        size = _wire_size(item)
        with self.lock:
            if self.bytes + size > self.max_bytes:
                if self.dropped == 0:
                    log.error("sonde: tensors for server-side metrics pile up faster than they are sent; dropping "
                              "some (lower sample= or every=)")
                self.dropped += 1
                return
            self.items.append(item)
            self.bytes += size

    def mark(self, mark: Mark) -> None:
        """Queue a boundary after every item shipped so far (never dropped: it carries no tensor)."""
        with self.lock:
            self.items.append(mark)

    def pump(self, most_bytes: int = 16 << 20) -> None:
        """Hand waiting items over as payloads of at most ``most_bytes`` (sender thread)."""
        with self.pumping:
            self._pump(most_bytes)

    def _pump(self, most_bytes: int) -> None:
        if self.send is None:
            return
        while True:
            with self.lock:
                batch: list[TensorItem | Mark] = []
                size = 0
                while self.items and (not batch or size + _wire_size(self.items[0]) <= most_bytes):
                    item = self.items.popleft()
                    size += _wire_size(item)
                    batch.append(item)
                self.bytes -= size
            if not batch:
                return
            batch_id = str(uuid.uuid4())
            self.send(encode_payload(batch_id, batch), batch_id, len(batch))


def _wire_size(item: TensorItem | Mark) -> int:
    return 0 if isinstance(item, Mark) else item.tensor.nbytes // 2  # float64 on the host, float32 on the wire


class ServerMetric(Metric):
    """Runs a registered metric on the server's evaluator instead of the training process.

    The probe copies the first ``sample`` rows (all when None) of each tensor the metric would
    see (and the rows' labels, if any) and ships them at the end of the step; the evaluator runs
    ``metric`` configured with ``kwargs`` on them and stores its Records under the run, same
    names, same steps. Needs ``server=`` (or a ``RemoteSink``) on the probe.

    Args:
        metric: registered metric name (``"histogram"``, ``"saturation"``, ...).
        sample: rows (first dimension) shipped per tensor; None ships everything.
        every: when to ship, an int or a schedule (default: the probe's ``every=``).
        **kwargs: the metric's own arguments (JSON values: numbers, strings, lists), including
            its ``compute_every``/``reset``, which the evaluator honours.

    Example:
        >>> m = ServerMetric("histogram", bins=16, sample=128)
        >>> m.topics == registry()["histogram"].topics
        True
    """

    name = "server"
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"sample": (1, 1 << 20)}

    def __init__(self, metric: str, *, sample: int | None = 1024, every: Any = None, **kwargs: Any) -> None:
        super().__init__(every=every)
        spec = {"name": metric, "kwargs": kwargs}
        try:
            json.dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"ServerMetric({metric!r}, ...): {exc}; arguments must be JSON values") from exc
        try:
            inner = metric_from_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"ServerMetric({metric!r}, ...): {exc}") from exc
        self.check_settings(sample=sample)  # None ships every row
        self.spec = spec
        self.sample = sample
        self.topics = type(inner).topics  # type: ignore[misc]
        self.shipper = TensorShipper()
        self.where: tuple[int, str, str, str, str] | None = None
        self.add_state("tensor", default=None, reduce=_cat)
        self.add_state("labels", default=None, reduce=_cat)

    def emits(self) -> tuple[str, ...]:
        return ()  # nothing computed here; the evaluator's Records come from the server

    def update(self, capture: Capture) -> None:
        tensor = capture.tensor.detach()
        if self.sample is not None and tensor.ndim > 0:
            tensor = tensor[: self.sample]
        # A copy: the probe reuses buffers and later layers may modify activations in place.
        self.stage("tensor", tensor.clone())
        labels = capture.labels
        if labels is not None and tensor.ndim > 0 and labels.ndim == 1 and len(labels) >= len(tensor):
            self.stage("labels", labels.detach()[: len(tensor)].clone())
        self.where = (capture.step, capture.phase, capture.layer, capture.topic, capture.layer_type)

    def compute(self) -> dict[str, Any]:
        tensor, labels = self.state["tensor"], self.state["labels"]
        if tensor is None or self.where is None:
            return {}
        if labels is not None and (np.ndim(tensor) == 0 or len(labels) != len(tensor)):
            labels = None
        step, phase, layer, topic, layer_type = self.where
        self.shipper.ship(TensorItem(step, phase, layer, topic, np.asarray(tensor), labels, [self.spec], layer_type))
        return {}

    def boundary(self, kind: str) -> None:
        """Tell the evaluator, in order with the shipped tensors, that an epoch or the run ended."""
        self.shipper.mark(Mark(MARKS[kind], [self.spec]))

    def __repr__(self) -> str:
        return f"ServerMetric({self.spec['name']!r}, sample={self.sample}, **{self.spec['kwargs']!r})"
