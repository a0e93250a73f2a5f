"""Checks across the ranks of a distributed run, carried by the merge's own collectives.

:class:`~sonde.probe.distributed.RankMerge` runs its ``checks`` at each merge (recorded train
steps and the last flush): each check adds values to the merge's MAX/MIN buffers or to its gather
while it is packed, and turns the reduced values into Records once the collectives are done. They
add no collective of their own.

* :class:`DesyncCheck`: parameters of a DDP model are replicated, bit for bit, on every rank. One
  integer checksum per layer (the sum of its parameters' bit patterns read as integers, taken
  modulo 2⁵², so exact in float64 and independent of the order of summation) travels in the MAX
  and in the MIN buffer; a layer whose maximum differs from its minimum differs on some rank. The
  first such layer in model order gets an alert Record (its layer, topic ``weights``), once per
  episode: raised again only after the ranks were found in step again. Sharded parameters (``DTensor``) are skipped.
* :class:`PerRankView` (``per_rank=True``): each rank's own ``activations`` values, computed from
  its unmerged state before the merge and gathered to rank 0, recorded as layer ``<layer>@rank<r>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from sonde.metrics.base import Metric
from sonde.records import Record

__all__ = ["DesyncCheck", "PerRankView", "RankCheck", "is_per_rank", "rank_layer"]

log = logging.getLogger("sonde")

#: Checksums are kept modulo 2**52: every value is then an exact float64.
_MODULUS = 1 << 52
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rank_layer(layer: str, rank: int) -> str:
    """The layer name of one rank's own values (``per_rank=True``): ``fc1@rank1``."""
    return f"{layer}@rank{rank}"


def is_per_rank(layer: str) -> bool:
    """Whether ``layer`` names one rank's own values (:func:`rank_layer`)."""
    head, mark, rank = layer.rpartition("@rank")
    return bool(mark and head and rank.isdigit())


class RankCheck(Protocol):
    """What :class:`~sonde.probe.distributed.RankMerge` asks of a check at each merge."""

    def pack(self, pack: Any, due: list[tuple[str, str, Metric]]) -> None:
        """Add this rank's values to the merge's buffers (``pack.maxes``, ``pack.mins``,
        ``pack.objects``) and describe them in ``pack.schema`` (the same on every rank)."""

    def unpack(self, reduced: dict[str, np.ndarray], gathered: list[Any], step: int) -> list[Record]:
        """The Records the reduced values give (rank 0 writes them)."""


def _bit_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor``'s elements' bit patterns read as integers (int64, on its device)."""
    t = tensor.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1).view(_INTS[t.element_size()]).sum(dtype=torch.int64)


class DesyncCheck:
    """Ranks whose replicated parameters differ: an alert naming the first layer that diverged.

    Args:
        run: the run's name (for the Records).
        layers: each layer's parameters, in model order.
    """

    def __init__(self, run: str, layers: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> None:
        self.run = run
        dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", ())
        self.layers = [(name, [p for p in params if not isinstance(p, dtensor)]) for name, params in layers]
        self.layers = [(name, params) for name, params in self.layers if params]
        self.out_of_sync = False  # an alert was raised and the ranks were not seen in step since
        self._at = (0, 0)  # where this merge's checksums sit in the max and min buffers

    def checksums(self) -> list[float]:
        """One exact checksum per layer (one transfer to the host for all of them)."""
        if not self.layers:
            return []
        sums = [torch.stack([_bit_sum(p) for p in params]).sum() for _, params in self.layers]
        device = sums[0].device
        stacked = torch.remainder(torch.stack([s.to(device) for s in sums]), _MODULUS)
        return [float(v) for v in stacked.cpu().tolist()]

    def pack(self, pack: Any, due: list[tuple[str, str, Metric]]) -> None:
        values = self.checksums()
        self._at = (len(pack.maxes), len(pack.mins))
        pack.maxes.extend(values)
        pack.mins.extend(values)
        pack.schema.append(("desync", [name for name, _ in self.layers]))

    def unpack(self, reduced: dict[str, np.ndarray], gathered: list[Any], step: int) -> list[Record]:
        if not self.layers:
            return []
        n = len(self.layers)
        highest = reduced["max"][self._at[0] : self._at[0] + n]
        lowest = reduced["min"][self._at[1] : self._at[1] + n]
        diverged = [name for (name, _), hi, lo in zip(self.layers, highest, lowest, strict=True) if hi != lo]
        if not diverged:
            self.out_of_sync = False
            return []
        if self.out_of_sync:
            return []  # the same episode: alerted already
        self.out_of_sync = True
        others = f" (and {len(diverged) - 1} later layer(s))" if len(diverged) > 1 else ""
        return [Record(self.run, step, "train", diverged[0], "weights", "alert", 1.0, message=(
            f"ranks out of sync at step {step}: the parameters of layer {diverged[0]!r}{others} differ across "
            "the ranks of this DDP model, which should hold identical copies (a rank that skipped or repeated "
            "an optimizer step, a parameter changed outside the optimizer on one rank, a non-deterministic "
            "update); from here on the ranks train different models"))]


class PerRankView:
    """Each rank's own ``activations`` values, before the merge, recorded as ``<layer>@rank<r>``.

    Args:
        run: the run's name (for the Records).
        topics: the topics whose per-rank values are recorded.
    """

    def __init__(self, run: str, topics: Sequence[str] = ("activations",)) -> None:
        self.run = run
        self.topics = tuple(topics)
        self._at = 0  # this merge's entry in the gathered objects

    def pack(self, pack: Any, due: list[tuple[str, str, Metric]]) -> None:
        own: list[tuple[str, str, dict[str, Any]]] = []
        for layer, topic, metric in due:
            if topic not in self.topics:
                continue
            try:
                own.append((layer, topic, metric.snapshot().compute()))
            except Exception as exc:  # noqa: BLE001 - this value alone is missing; the merge goes on
                log.debug("sonde: per-rank %s of %r at this rank failed: %s", metric.name, layer, exc)
        self._at = len(pack.objects)
        pack.objects.append(own)
        pack.schema.append(("per_rank", self.topics))

    def unpack(self, reduced: dict[str, np.ndarray], gathered: list[Any], step: int) -> list[Record]:
        records = []
        for rank, objects in enumerate(gathered):
            for layer, topic, values in objects[self._at]:
                for name, value in values.items():
                    records.append(Record(self.run, step, "train", rank_layer(layer, rank), topic, name, value))
        return records
