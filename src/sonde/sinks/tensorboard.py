"""TensorBoard sink: Records to TensorBoard event files, in TensorBoard's own record format.

Scalars become ``simple_value`` summaries; ``histogram`` counts, joined with the latest
``histogram_edges`` of the same (phase, layer, topic), become real ``HistogramProto``
summaries; an ``alert`` becomes a text summary (TensorBoard's Text tab) holding its message.
Nothing here imports a training framework: the sink sees only Records. The event file is
written with TensorBoard's framing (:class:`~tensorboard.summary.writer.record_writer.RecordWriter`,
length and masked CRC-32C around each serialized ``Event``) into a plain file: TensorBoard's own
``EventFileWriter`` opens its file through ``tf.io.gfile``, which imports TensorFlow whenever it is
installed, so a PyTorch run would load TensorFlow just to write a file.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

try:  # the 'tensorboard' extra; the sink says so when it is made without it
    from tensorboard.compat.proto import types_pb2
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.summary.writer.record_writer import RecordWriter

    _MISSING: ImportError | None = None
except ImportError as _exc:
    _MISSING = _exc

from sonde.errors import StoreError
from sonde.extras import missing
from sonde.records import Record, tag
from sonde.run_info import RunInfo
from sonde.sinks.base import Sink

__all__ = ["EventFile", "TensorBoardSink", "histogram_proto", "text_value"]

log = logging.getLogger("sonde")

_Key = tuple[str, str, str]  # (phase, layer, topic)

#: Seconds at most between writing an event and TensorBoard being able to read it.
FLUSH_EVERY = 10.0

# Histograms whose edges have not arrived yet wait this many steps at most per key.
_MAX_PENDING = 1000


class EventFile:
    """One TensorBoard event file in ``logdir``, named as TensorBoard names them, written as it writes them.

    Example:
        >>> import tempfile
        >>> events = EventFile(tempfile.mkdtemp())
        >>> events.add_event(Event(step=0, summary=Summary(value=[Summary.Value(tag="loss", simple_value=1.0)])))
        >>> events.close()
    """

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        self._file: BinaryIO = open(os.path.join(logdir, name), "wb")  # closed by close()
        self._records = RecordWriter(self._file)
        self._flushed_at = time.monotonic()
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def get_logdir(self) -> str:
        """The directory the file is in."""
        return self.logdir

    def add_event(self, event: Event) -> None:
        """Append one ``Event``; what was written reaches the file at least every :data:`FLUSH_EVERY` seconds."""
        self._records.write(event.SerializeToString())
        if time.monotonic() - self._flushed_at > FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Hand what was written to the operating system."""
        self._file.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()


def histogram_proto(counts: np.ndarray, edges: np.ndarray) -> HistogramProto:
    """A TensorBoard ``HistogramProto`` from bin counts and their ``len(counts) + 1`` edges.

    The raw values are gone by the time a Record exists, so ``sum`` and ``sum_squares`` are
    estimated from bin centres; ``min``/``max`` are the outer edges of the outermost non-empty
    bins, which is what TensorBoard uses as the left and right limits when it draws them.

    Example:
        >>> h = histogram_proto(np.array([1.0, 3.0]), np.array([0.0, 1.0, 2.0]))
        >>> h.num, list(h.bucket_limit), h.sum
        (4.0, [1.0, 2.0], 5.0)
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    nonzero = np.flatnonzero(counts > 0)
    if nonzero.size:
        low, high = float(edges[nonzero[0]]), float(edges[nonzero[-1] + 1])
    else:
        low, high = float(edges[0]), float(edges[-1])
    return HistogramProto(
        min=low,
        max=high,
        num=float(counts.sum()),
        sum=float((counts * centres).sum()),
        sum_squares=float((counts * centres**2).sum()),
        bucket_limit=edges[1:].tolist(),
        bucket=counts.tolist(),
    )


class TensorBoardSink(Sink):
    """Writes Records as TensorBoard event files under ``<logdir>/<run name>/``.

    Scalar records are written with tag ``tag(record)`` at global step ``record.step``.
    ``histogram`` records are written as histograms using the latest ``histogram_edges``
    record of the same (phase, layer, topic). Other array-valued records are skipped.

    Args:
        logdir: Parent directory; each run gets its own subdirectory, as TensorBoard expects.

    Example:
        >>> sink = TensorBoardSink(logdir="runs")          # doctest: +SKIP
        >>> sink.open(RunInfo(name="mlp"))                 # doctest: +SKIP
        >>> sink.write([Record("mlp", 0, "train", "", "loss", "loss", 0.7)])  # doctest: +SKIP
        >>> sink.close()                                   # doctest: +SKIP
    """

    name = "tensorboard"

    def __init__(self, logdir: str | os.PathLike[str] = "runs") -> None:
        if _MISSING is not None:
            raise missing("tensorboard", "tensorboard", "TensorBoardSink") from _MISSING
        self.logdir = os.fspath(logdir)
        self._writer: EventFile | None = None
        self._edges: dict[_Key, np.ndarray] = {}
        self._pending: dict[_Key, list[Record]] = {}
        self._warned: set[tuple[str, _Key]] = set()

    @property
    def run_dir(self) -> str | None:
        """Directory of the open run's event files, or ``None`` before :meth:`open`."""
        return None if self._writer is None else self._writer.get_logdir()

    def open(self, run: RunInfo) -> None:
        path = os.path.join(self.logdir, run.name)
        try:
            os.makedirs(path, exist_ok=True)
            # The writer creates its event file right away, so an unwritable directory fails here.
            self._writer = EventFile(path)
        except OSError as exc:
            raise StoreError(
                f"cannot write TensorBoard events to {path!r}: {exc}; pass a writable logdir= to TensorBoardSink"
            ) from exc

    def write(self, records: Sequence[Record]) -> None:
        writer = self._require_writer()
        # Edges of a step may arrive after that step's histogram in the same batch.
        fresh: dict[tuple[_Key, int], np.ndarray] = {
            (_key(r), r.step): np.asarray(r.value, dtype=np.float64)
            for r in records
            if r.metric == "histogram_edges" and isinstance(r.value, np.ndarray)
        }
        wall_time = time.time()
        step: int | None = None
        values: list[Summary.Value] = []
        for record in records:
            for at, value in self._summary_values(record, fresh):
                # One event per step keeps files small; a step change starts a new event.
                if at != step and values:
                    writer.add_event(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))
                    values = []
                step = at
                values.append(value)
        if values:
            writer.add_event(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, status: str = "finished") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _require_writer(self) -> EventFile:
        if self._writer is None:
            raise RuntimeError("TensorBoardSink.write() called before open(); open the sink with a RunInfo first")
        return self._writer

    def _summary_values(
        self, record: Record, fresh: dict[tuple[_Key, int], np.ndarray]
    ) -> list[tuple[int, Summary.Value]]:
        if record.message:
            return [(record.step, text_value(tag(record), record.message))]
        if record.is_scalar:
            return [(record.step, Summary.Value(tag=tag(record), simple_value=float(record.value)))]
        key = _key(record)
        if record.metric == "histogram_edges":
            edges = self._edges[key] = np.asarray(record.value, dtype=np.float64)
            waiting = self._pending.pop(key, [])
            return [(r.step, v) for r in waiting if (v := self._histogram_value(r, edges)) is not None]
        if record.metric != "histogram":
            return []
        known = fresh.get((key, record.step), self._edges.get(key))
        if known is None:
            waiting = self._pending.setdefault(key, [])
            if len(waiting) < _MAX_PENDING:
                waiting.append(record)
            return []
        value = self._histogram_value(record, known)
        return [] if value is None else [(record.step, value)]

    def _histogram_value(self, record: Record, edges: np.ndarray) -> Summary.Value | None:
        counts = np.asarray(record.value, dtype=np.float64)
        if counts.ndim != 1 or edges.shape != (counts.size + 1,) or not all(map(math.isfinite, edges)):
            self._warn_once("edges", _key(record), f"histogram {tag(record)!r} at step {record.step} has "
                            f"{counts.size} bins but its edges have shape {edges.shape} (or are not finite); skipped")
            return None
        return Summary.Value(tag=tag(record), histo=histogram_proto(counts, edges))

    def _warn_once(self, kind: str, key: _Key, message: str) -> None:
        if (kind, key) not in self._warned:
            self._warned.add((kind, key))
            log.warning("sonde: tensorboard sink: %s", message)


def text_value(name: str, text: str) -> Summary.Value:
    """A summary value TensorBoard's Text plugin shows: one string tensor.

    Example:
        >>> text_value("fc1/activations/alert", "dead units").metadata.plugin_data.plugin_name
        'text'
    """
    tensor = TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    return Summary.Value(tag=name, metadata=metadata, tensor=tensor)


def _key(record: Record) -> _Key:
    return (record.phase, record.layer, record.topic)
