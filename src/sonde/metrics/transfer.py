"""A recorded step's staged partials on their way to the host: packed into one buffer per device.

At a flush every partial the metrics staged (:meth:`sonde.metrics.base.Metric.stage`) is gathered
here. Host values (numpy arrays, CPU tensors, floats) are read at once; the tensors on an
accelerator are concatenated, per device, into one flat float64 buffer on that device (float64
holds the counts and the float64 partials exactly). Then :meth:`Transfer.start` moves each buffer
to the host and :meth:`Transfer.wait` unpacks the host copy into one array per staged partial.

On CUDA the move is asynchronous: one ``copy_(non_blocking=True)`` into pinned host memory,
followed by a ``torch.cuda.Event`` recorded on the current stream. :meth:`start` returns at
once, without any host synchronisation; :meth:`wait`, called on a background thread, blocks on
the event alone (``event.synchronize()``), never on the device or the stream. Other accelerators
copy with a blocking ``.cpu()`` in :meth:`start`.

A ``copier`` chooses, per device, how a flat buffer reaches the host (:func:`default_copier`:
the CUDA path above for CUDA devices, nothing for the others); a copier given for the CPU packs
CPU tensors too, which is how the packing and the event-driven wait are tested without a GPU.

Example:
    >>> import torch
    >>> partials = [torch.tensor(2.0), (3.0, torch.tensor(4))]
    >>> transfer = Transfer(partials)
    >>> transfer.start()
    >>> host = transfer.wait()
    >>> float(host[id(partials[0])]), host[id(partials[1])].tolist()
    (2.0, [3.0, 4.0])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["Copier", "Event", "Transfer", "cuda_copy", "default_copier", "on_stream", "read_back"]


class Event(Protocol):
    """What :meth:`Transfer.wait` needs of a copy's completion marker (``torch.cuda.Event``)."""

    def synchronize(self) -> None:
        """Block the calling thread until the copy is done."""


#: ``copy(flat)``: starts moving a flat device buffer to the host; returns the host tensor it is
#: written into and the event that marks the end of the copy.
Copy = Callable[[torch.Tensor], tuple[torch.Tensor, Event]]
#: ``copier(device)``: the copy for buffers on ``device``, or None (CPU: read in place; another
#: accelerator: a blocking ``.cpu()``).
Copier = Callable[[torch.device], Copy | None]


def cuda_copy(flat: torch.Tensor) -> tuple[torch.Tensor, Event]:
    """Start copying ``flat`` (on a CUDA device) into pinned host memory; no host synchronisation."""
    host = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flat.device))
    return host, event


@contextlib.contextmanager
def on_stream(stream: Any) -> Iterator[None]:
    """Device work of a background thread on ``stream`` (a ``torch.cuda.Stream``: the one the
    training thread made the tensors on, so that the work is ordered after them); None: the
    thread's current stream, as it is (the CPU has none)."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def read_back(tensor: torch.Tensor, stream: Any = None) -> np.ndarray:
    """For a background thread: ``tensor``'s values on the host. A CUDA tensor is copied into pinned
    memory after the work already queued on ``stream`` (:func:`on_stream`; None: the current one),
    and the thread waits on an event recorded after the copy: never on the device as a whole, and
    no synchronising call that ``torch.cuda.set_sync_debug_mode`` reports. Other tensors are read
    with ``.cpu()``.

    Example:
        >>> read_back(torch.tensor([[1.0, 2.0]])).tolist()
        [[1.0, 2.0]]
    """
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    with on_stream(stream):
        host, event = cuda_copy(tensor.reshape(-1))
    event.synchronize()
    return host.numpy().reshape(tuple(tensor.shape))


def default_copier(device: torch.device) -> Copy | None:
    """The asynchronous copy for CUDA devices; None for the others."""
    return cuda_copy if device.type == "cuda" else None


class _Group:
    """The staged tensors of one device, packed into one flat buffer."""

    __slots__ = ("copy", "event", "flat", "host", "offsets", "size", "tensors")

    def __init__(self, copy: Copy | None) -> None:
        self.copy = copy
        self.tensors: list[torch.Tensor] = []
        self.offsets: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # id(tensor) -> (start, stop, shape)
        self.size = 0
        self.flat: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self.event: Event | None = None

    def add(self, tensor: torch.Tensor) -> None:
        if id(tensor) not in self.offsets:
            stop = self.size + tensor.numel()
            self.offsets[id(tensor)] = (self.size, stop, tuple(tensor.shape))
            self.size = stop
            self.tensors.append(tensor)


class Transfer:
    """The staged partials of one flush: host values read now, device tensors packed per device.

    Args:
        staged: the staged partials (tensors, numpy arrays, tuples of 0-d tensors and floats).
        copier: how each device's buffer reaches the host (default :func:`default_copier`).

    Attributes:
        asynchronous: whether every packed buffer moves without blocking (all on CUDA, or all
            given a copier), so that :meth:`wait` may run on another thread.
    """

    def __init__(self, staged: Iterable[Any], copier: Copier = default_copier) -> None:
        self._host: dict[int, np.ndarray] = {}
        self._pending: list[tuple[int, Any]] = []  # staged partials with a part in a device group
        self._groups: dict[torch.device, _Group] = {}
        self._copies: dict[torch.device, Copy | None] = {}
        seen: set[int] = set()
        for value in staged:
            key = id(value)
            if key in seen:
                continue
            seen.add(key)
            if isinstance(value, np.ndarray):
                self._host[key] = value
                continue
            parts = value if isinstance(value, tuple) else (value,)
            packed = False
            for part in parts:
                if isinstance(part, torch.Tensor) and self._packs(part.device, copier):
                    self._groups[part.device].add(part)
                    packed = True
            if packed:
                self._pending.append((key, value))
            else:
                self._host[key] = _cpu_value(value)
        self.asynchronous = all(group.copy is not None for group in self._groups.values())

    def _packs(self, device: torch.device, copier: Copier) -> bool:
        """Whether tensors on ``device`` go through a packed buffer (creating its group)."""
        if device not in self._copies:
            copy = self._copies[device] = copier(device)
            if copy is not None or device.type != "cpu":
                self._groups[device] = _Group(copy)
        return device in self._groups

    @property
    def devices(self) -> list[torch.device]:
        """The devices with a packed buffer."""
        return list(self._groups)

    def start(self) -> None:
        """Pack each device's tensors into one float64 buffer and start moving it to the host."""
        for group in self._groups.values():
            flat = torch.empty(group.size, dtype=torch.float64, device=group.tensors[0].device)
            # One concatenation per device; each part is cast straight to float64 (counts stay exact).
            torch.cat([t.detach().reshape(-1) for t in group.tensors], out=flat)
            group.tensors = []  # the buffer holds the values now
            if group.copy is None:
                group.host = flat.cpu()
            else:
                group.flat = flat  # kept alive until the copy is done
                group.host, group.event = group.copy(flat)

    def wait(self) -> dict[int, np.ndarray]:
        """Host copies of every staged partial, keyed by ``id`` of the staged value (float64 arrays;
        a tuple becomes one vector). Blocks on the copies' events only."""
        fetched: dict[int, np.ndarray] = {}
        for group in self._groups.values():
            if group.event is not None:
                group.event.synchronize()
            assert group.host is not None, "Transfer.wait() before Transfer.start()"
            flat = group.host.numpy().copy()  # the state must not hold on to the pinned buffer
            for key, (start, stop, shape) in group.offsets.items():
                fetched[key] = flat[start:stop].reshape(shape)
            group.flat = None
        host = dict(self._host)
        for key, value in self._pending:
            if isinstance(value, tuple):
                host[key] = np.array([_part_value(p, fetched) for p in value], dtype=np.float64)
            else:
                host[key] = fetched[key]
        return host


def _cpu_value(value: Any) -> np.ndarray:
    if isinstance(value, tuple):
        return np.array([float(p) for p in value], dtype=np.float64)
    return value.detach().numpy().astype(np.float64, copy=False)


def _part_value(part: Any, fetched: dict[int, np.ndarray]) -> float:
    if isinstance(part, torch.Tensor):
        key = id(part)
        return float(fetched[key]) if key in fetched else float(part)
    return float(part)
