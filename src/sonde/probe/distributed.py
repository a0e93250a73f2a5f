"""Under torch.distributed: one run, one writer, and metric states merged exactly across ranks.

Every rank captures; rank 0 alone opens the store, the sinks and the remote connection, and
decides the run's name (:func:`agree`). At each recorded train step the metric engine hands the
instances about to compute to :class:`RankMerge` (its ``merge_ranks`` hook) before ``compute``,
and their declared states are reduced through torch.distributed, packed into as few collectives
as possible:

1. one small ``all_reduce(MAX)`` of a control vector: a failure flag, the lengths of the buffers
   below and a checksum of what is merged (layers, topics, metrics, states, shapes) — so a rank
   that failed, or that would merge something else, is seen by every rank at the same point;
2. one flat float64 ``all_reduce`` per reduction kind (sum, max, min);
3. one gather of pickled objects (:func:`all_gather_objects`: two ``all_gather`` calls) for the
   states no arithmetic reduce describes (sample reservoirs, kept-first or kept-latest values),
   folded in rank order with the state's own reduce.

The tensors handed to these collectives live on the CPU, or on the current CUDA device under a
NCCL-only process group, and stay referenced from Python (:data:`_HELD`) so that no process group
thread ever frees one of them at interpreter exit.

A tensor summary (:func:`sonde.functional.merge_summaries`) travels as sums (count, Σx, Σx²,
Σ|x|, zeros, NaNs, Infs) and extremes (min, max); a histogram's range is the min and max of the
ranks' ranges (the range one process would see on the global batch), and its counts add from the
next recorded step on, once every rank bins over the same edges (the counts of the step that fixes
the edges were taken over each rank's own range, and are dropped).
Parameter topics (weights, gradients, updates) of a replicated model are identical on every rank
after DDP's all-reduce: rank 0's state is taken, the others contribute the reduction's identity.
Those of parameters sharded across ranks (FSDP2's DTensor parameters) are captured from each rank's
local shard (:func:`local_shard`) and every rank's state is merged, which gives the statistics of
the whole parameter without gathering it; the probe says which layers and topics these are
(:func:`shards`, :attr:`RankMerge.shards`).

The checks across ranks (:mod:`sonde.probe.rank_checks`: parameters out of sync, each rank's own
values) add their values to these buffers and to the gather at recorded train steps; they make no
collective of their own.

An evaluation pass is merged the same way when the probe flushes it (at the next train forward, or
when the probe closes): each rank has recorded its own share of the validation batches, and the
merge gives the statistics of the whole validation set. Every rank reaches that flush at the same
point, provided each ran at least one batch of the pass. The phase is part of the checksum, so an
evaluation merge that meets another rank's train merge (a rank that ran no evaluation batch) is
seen as a disagreement: every rank switches monitoring off, loudly.

When the control vector says a rank failed or the ranks disagree, every rank logs it, computes
nothing for that step, and switches monitoring off; no later collective is made. A rank whose
flush fails before its merge meets the others there with the failure flag (:meth:`RankMerge.abandon`).
"""

from __future__ import annotations

import logging
import pickle
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sonde import functional as F
from sonde.errors import ConfigError, ProbeError
from sonde.functional.stats import ABS_SUM, INFS, M2, MAX, MEAN, MIN, NANS, ZEROS, N
from sonde.metrics.base import _REDUCERS, Metric
from sonde.metrics.stats import Histogram
from sonde.probe.rank_checks import RankCheck
from sonde.records import Record
from sonde.topics import GRADS_AND_UPDATES, PARAM_TOPICS

__all__ = ["RankMerge", "agree", "averages_gradients", "counted", "local_shard", "shards", "world"]

log = logging.getLogger("sonde")

_SUMMARY_SUMS = (N, ABS_SUM, ZEROS, NANS, INFS)


def world() -> tuple[int, int] | None:
    """``(rank, world size)`` inside an initialised process group of more than one rank, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


#: The tensors sonde last handed to collectives, referenced from Python for as long as the process
#: lives. A process group's worker thread (gloo's) may drop its reference to a collective's work
#: after the call returned; if that is a tensor's last reference, the thread takes the GIL to free
#: the tensor's Python object, and at interpreter exit a thread taking the GIL is ended inside C++:
#: the process aborts ("terminate called without an active exception"). Held here, the last
#: reference is Python's own.
_HELD: deque[torch.Tensor] = deque(maxlen=32)


def _device() -> torch.device:
    """Where the default group's collectives take their tensors: the current CUDA device under a
    NCCL-only group (``init_process_group("nccl")``), else the CPU (gloo, or ``cpu:gloo,cuda:nccl``)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and "cpu" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _held(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the collectives' device, kept in :data:`_HELD`."""
    tensor = tensor.to(_device())
    _HELD.append(tensor)
    return tensor


def all_reduce(values: list[float], op: Any) -> np.ndarray:
    """``values`` reduced across ranks (float64, one collective)."""
    buffer = _held(torch.tensor(values, dtype=torch.float64))
    torch.distributed.all_reduce(buffer, op=op)
    return buffer.cpu().numpy()


def all_gather_objects(value: Any, size: int) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order: two ``all_gather`` calls on tensors that
    :data:`_HELD` keeps (the lengths, then the padded pickles)."""
    data = pickle.dumps(value)
    length = _held(torch.tensor([len(data)], dtype=torch.int64))
    lengths = [_held(torch.zeros(1, dtype=torch.int64)) for _ in range(size)]
    torch.distributed.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = _held(padded)
    out = [_held(torch.zeros(max(sizes), dtype=torch.uint8)) for _ in range(size)]
    torch.distributed.all_gather(out, mine)
    return [pickle.loads(o[:n].cpu().numpy().tobytes()) for o, n in zip(out, sizes)]


def agree(rank: int, decide: Callable[[], str]) -> str:
    """The value rank 0's ``decide()`` returns, on every rank.

    A failure of ``decide`` on rank 0 (an unwritable store) is raised on every rank, with the
    same message, instead of leaving the others waiting.
    """
    message: list[Any] = [None, None]
    error: Exception | None = None
    if rank == 0:
        try:
            message[0] = decide()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error = exc
            message[1] = f"{type(exc).__name__}: {exc}"
    message = all_gather_objects(message, torch.distributed.get_world_size())[0]
    if error is not None:
        raise error
    if message[1] is not None:
        raise ProbeError(f"sonde: rank 0 could not start the run: {message[1]}")
    return str(message[0])


def _dtensor_type() -> Any:
    """``DTensor``, once something imported it (no DTensor exists before), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_shard(value: Any) -> Any:
    """This rank's local shard of a ``DTensor`` (an FSDP2 parameter, its gradient); any other value as it is.

    Reads no other rank's data: no collective runs.
    """
    dtensor = _dtensor_type()
    return value.to_local() if dtensor is not None and isinstance(value, dtensor) else value


def counted(tensor: Any, rank: int) -> bool:
    """Whether this rank's part of a parameter counts in the merge of the parameter's statistics.

    A ``DTensor``'s local shard counts where this rank's mesh coordinate is 0 on every mesh
    dimension the tensor is replicated over (HSDP's replicas), so that each shard counts once: with
    FSDP2 over a 1-D mesh, on every rank. A plain tensor is the same on every rank (DDP, or no
    wrapper): rank 0's counts.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return rank == 0
    coordinate = tensor.device_mesh.get_coordinate()
    return coordinate is not None and all(
        placement.is_shard() or at == 0 for placement, at in zip(tensor.placements, coordinate, strict=True))


def shards(params: Mapping[str, Iterable[tuple[str, Any]]], rank: int,
           kind: Callable[[str], str]) -> tuple[dict[tuple[str, str], bool], set[int]]:
    """Where a probe's parameters are sharded across ranks, for :attr:`RankMerge.shards`.

    Args:
        params: each layer's ``(name, parameter)`` pairs.
        rank: this process's rank.
        kind: a parameter's topic (``weights`` or ``biases``) from its name.

    Returns:
        ``(layer, topic)`` → whether this rank's state counts, for every parameter topic of a
        layer with a ``DTensor`` parameter; and the ids of the parameters this rank does not
        publish: in a layer whose state counts here, those whose part does not count here (a
        replicated parameter next to sharded ones), so that nothing is counted twice.
    """
    merged: dict[tuple[str, str], bool] = {}
    skipped: set[int] = set()
    dtensor = _dtensor_type()
    if dtensor is None:
        return merged, skipped
    for layer, named in params.items():
        by_kind: dict[str, list[Any]] = {}
        for name, param in named:
            by_kind.setdefault(kind(name), []).append(param)
        for topic, group in by_kind.items():
            if not any(isinstance(p, dtensor) for p in group):
                continue
            counts = [counted(p, rank) for p in group]
            here = any(counts)
            for each in (topic, *GRADS_AND_UPDATES[topic]):
                merged[(layer, each)] = here
            if here:
                skipped.update(id(p) for p, c in zip(group, counts, strict=True) if not c)
    return merged, skipped


def averages_gradients(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameter gradients are averaged over the ranks: DDP, or FSDP2
    (``fully_shard`` on the model or any of its modules)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    return module_type is not None and any(isinstance(m, module_type) for m in model.modules())


@dataclass
class _Packing:
    """One rank's contribution to a merge, and where each value goes back."""

    sums: list[float] = field(default_factory=list)
    maxes: list[float] = field(default_factory=list)
    mins: list[float] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)
    schema: list[Any] = field(default_factory=list)
    # (metric, state name, kind, slot offsets): how to write each reduced value back.
    slots: list[tuple[Metric, str, str, tuple[int, ...]]] = field(default_factory=list)
    # the checks across ranks that added values (train merges only)
    checks: list[RankCheck] = field(default_factory=list)
    # id(metric) -> the state this rank packed (Metric.shared_state): the shapes to unpack
    shared: dict[int, dict[str, Any]] = field(default_factory=dict)


class RankMerge:
    """The metric engine's ``merge_ranks`` hook (:class:`~sonde.metrics.engine.RankMerger`): reduces
    due metric states across ranks.

    Args:
        rank: this process's rank.
        size: the number of ranks.
        recorded: whether a step is a recorded one (collectives happen only there, at the flush of an
            evaluation pass, and at the last flush).
        switch_off: called on every rank when monitoring stops (a failure anywhere, or disagreement).
    """

    def __init__(self, rank: int, size: int, recorded: Callable[[int], bool], switch_off: Callable[[], None]) -> None:
        self.rank = rank
        self.size = size
        self.recorded = recorded
        self.switch_off = switch_off
        self.active = True
        #: Bytes this rank sent through the collectives at the last merge (the benchmark reads it).
        self.last_bytes = 0
        #: Checks carried by the merge's collectives (:mod:`sonde.probe.rank_checks`), and the Records
        #: they gave, which the probe takes after each flush.
        self.checks: list[RankCheck] = []
        self.records: list[Record] = []
        self._merged = -1  # the last train step a merge was entered for
        #: Evaluation flushes whose merge was entered (whatever came of it).
        self.eval_merges = 0
        #: The probe is closing: its last flushes are followed by the final train merge on every rank.
        self.closing = False
        #: Parameter topics of sharded parameters, ``(layer, topic)`` → whether this rank's state
        #: counts (:func:`shards`); any other parameter topic counts on rank 0 alone (replicated).
        self.shards: dict[tuple[str, str], bool] = {}
        self._kept: list[tuple[Metric, dict[str, Any]]] = []  # own state of instances that keep it

    def restore(self) -> None:
        """Give instances that keep state across computes their own (unmerged) state back."""
        for metric, state in self._kept:
            metric.state = state
        self._kept = []

    def merge(self, phase: str, step: int, final: bool, due: list[tuple[str, str, Metric]]) -> bool:
        """Merge ``due`` in place; False when nothing may be computed (monitoring just switched off).

        A train step merges when it is recorded (or final); an evaluation pass at each of its
        flushes, which every rank that ran a batch of the pass reaches.
        """
        if phase != "train" and not self.eval_merged(step):
            return True  # this rank's own pass (rank 0 writes its own): no collective here
        if phase == "train":
            self._merged = step
        else:
            self.eval_merges += 1
        if not self.active:
            return False
        if phase == "train" and not (final or due or self.recorded(step)):
            return True
        packing: _Packing | None = None
        failure = ""
        try:
            ordered = sorted(due, key=lambda d: (d[0], d[1]))
            pack = self._pack(ordered)
            pack.schema.append(phase)  # an eval merge never passes for another rank's train merge
            if phase == "train":  # the checks across ranks look at train steps only
                pack.checks = list(self.checks)
                for check in pack.checks:
                    check.pack(pack, ordered)
            packing = pack
        except Exception as exc:  # noqa: BLE001 - reported on every rank through the control vector
            failure = f"{type(exc).__name__}: {exc}"
        try:
            return self._reduce(packing, failure, step)
        except Exception as exc:  # noqa: BLE001 - a broken process group: stop here, never retry
            self._off(f"a collective failed on rank {self.rank} ({type(exc).__name__}: {exc})")
            return False

    def abandon(self, step: int, final: bool, why: str) -> None:
        """This rank's flush of ``step`` failed before its merge: meet the other ranks' first
        collective with the failure flag, so that every rank switches off instead of waiting."""
        if not self.active or self._merged == step or not (final or self.recorded(step)):
            return
        self._merged = step
        try:
            self._reduce(None, why, step)
        except Exception as exc:  # noqa: BLE001 - a broken process group: stop here, never retry
            self._off(f"a collective failed on rank {self.rank} ({type(exc).__name__}: {exc})")

    def eval_merged(self, step: int) -> bool:
        """Whether the evaluation pass filed under ``step`` is merged: when the train step before it is
        a recorded one, or the probe is closing. Its flush is then followed on every rank by a train
        merge, so a rank that ran no batch of the pass meets the others' eval merge in sonde's own
        control vector (every rank sees the disagreement and switches off) and never in a collective
        of the training's (DDP's all-reduce), which would abort the process group."""
        return self.closing or self.recorded(step - 1)

    def abandon_eval(self, entered: int, step: int, why: str) -> None:
        """This rank's flush of an evaluation pass failed before its merge (``entered`` is what
        :attr:`eval_merges` was when the flush began): meet the other ranks' merge with the failure flag."""
        if not self.active or self.eval_merges != entered or not self.eval_merged(step):
            return
        self.eval_merges += 1
        try:
            self._reduce(None, why, step)
        except Exception as exc:  # noqa: BLE001 - a broken process group: stop here, never retry
            self._off(f"a collective failed on rank {self.rank} ({type(exc).__name__}: {exc})")

    # -- packing --------------------------------------------------------------------------------
    def _pack(self, due: list[tuple[str, str, Metric]]) -> _Packing:
        pack = _Packing()
        for layer, topic, metric in due:
            # replicated: rank 0's state alone; sharded: each rank's shard
            once = topic in PARAM_TOPICS and not self.shards.get((layer, topic), self.rank == 0)
            # the state on a footing every rank shares; what a metric keeps on its GPU, on the host
            shared = pack.shared[id(metric)] = {
                name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                for name, value in metric.shared_state().items()}
            for name, (_, reduce) in metric._defaults.items():
                value = shared[name]
                kind = _kind(metric, name, reduce)
                if value is None and kind == "sum" and isinstance(metric, Histogram):
                    value = np.zeros(metric.bins)  # nothing binned on this rank (an empty shard)
                shape = None if value is None else np.shape(value)
                fixed = kind in ("sum", "max", "min")  # the other kinds pack a size of their own
                pack.schema.append((layer, topic, metric.name, name, kind, shape if fixed else None))
                if kind == "drop":
                    pack.slots.append((metric, name, kind, ()))
                elif kind == "object":
                    pack.objects.append(None if once else value)
                    pack.slots.append((metric, name, kind, (len(pack.objects) - 1,)))
                elif kind == "summary":
                    pack.slots.append((metric, name, kind, _pack_summary(pack, value, once)))
                elif kind == "range":
                    lo, hi = (np.inf, -np.inf) if value is None or once else (float(value[0]), float(value[1]))
                    pack.slots.append((metric, name, kind, (len(pack.mins), len(pack.maxes))))
                    pack.mins.append(lo)
                    pack.maxes.append(hi)
                else:  # sum, max, min of numbers or arrays
                    if value is None:
                        raise ConfigError(f"metric {metric.name!r} state {name!r} is None on rank {self.rank}")
                    flat = np.asarray(value, dtype=np.float64).reshape(-1)
                    if once:
                        flat = np.full_like(flat, {"sum": 0.0, "max": -np.inf, "min": np.inf}[kind])
                    target = {"sum": pack.sums, "max": pack.maxes, "min": pack.mins}[kind]
                    pack.slots.append((metric, name, kind, (len(target),)))
                    target.extend(flat.tolist())
        return pack

    # -- the collectives ------------------------------------------------------------------------
    def _reduce(self, pack: _Packing | None, failure: str, step: int) -> bool:
        dist = torch.distributed
        lengths = [0.0, 0.0, 0.0, 0.0] if pack is None else [
            float(len(pack.sums)), float(len(pack.maxes)), float(len(pack.mins)), float(len(pack.objects))]
        checksum = 0.0 if pack is None else float(zlib.crc32(repr(pack.schema).encode()))
        control = [1.0 if pack is None else 0.0]
        for value in (*lengths, checksum):
            control += [value, -value]  # MAX of x and of -x: the largest and the smallest across ranks
        seen = all_reduce(control, dist.ReduceOp.MAX).tolist()
        self.last_bytes = len(control) * 8
        if seen[0] > 0:
            self._off(f"monitoring failed on rank {self.rank} at step {step} ({failure})" if failure
                      else f"monitoring failed on another rank at step {step}")
            return False
        if any(seen[i] != -seen[i + 1] for i in range(1, len(seen), 2)):
            self._off(f"the ranks recorded different layers, topics or metric states at step {step}")
            return False
        assert pack is not None
        reduced: dict[str, np.ndarray] = {}
        for kind, values, op in (("sum", pack.sums, dist.ReduceOp.SUM), ("max", pack.maxes, dist.ReduceOp.MAX),
                                 ("min", pack.mins, dist.ReduceOp.MIN)):
            if values:
                reduced[kind] = all_reduce(values, op)
                self.last_bytes += len(values) * 8
        gathered: list[Any] = []
        if pack.objects:
            gathered = all_gather_objects(pack.objects, self.size)
        self._unpack(pack, reduced, gathered)
        for check in pack.checks:
            try:
                self.records.extend(check.unpack(reduced, gathered, step))
            except Exception as exc:  # noqa: BLE001 - after the collectives: this check's Records alone are lost
                log.error("sonde: %s failed at step %d (%s: %s)", type(check).__name__, step, type(exc).__name__, exc)
        return True

    def _unpack(self, pack: _Packing, reduced: dict[str, np.ndarray], gathered: list[Any]) -> None:
        kept = {id(metric): metric for metric, *_ in pack.slots if metric.reset_policy != "compute"}
        self._kept = [(metric, dict(metric.state)) for metric in kept.values()]
        for metric, name, kind, offsets in pack.slots:
            try:
                self._unpack_one(metric, name, kind, offsets, reduced, gathered, pack.shared[id(metric)][name])
            except Exception as exc:  # noqa: BLE001 - this state alone is lost; the ranks stay in step
                metric.state[name] = None
                log.error("sonde: merging %r state %r across ranks failed (%s: %s); its value is missing",
                          metric.name, name, type(exc).__name__, exc)

    def _unpack_one(self, metric: Metric, name: str, kind: str, offsets: tuple[int, ...],
                    reduced: dict[str, np.ndarray], gathered: list[Any], value: Any) -> None:
        """Write one merged state back (``value``: this rank's, as packed)."""
        if kind == "drop":
            metric.state[name] = None
        elif kind == "object":
            merged = None
            _, reduce = metric._defaults[name]
            for part in (objects[offsets[0]] for objects in gathered):
                if part is not None:
                    merged = part if merged is None else reduce(merged, part)
            metric.state[name] = merged
        elif kind == "summary":
            metric.state[name] = _unpack_summary(reduced, offsets)
        elif kind == "range":
            lo, hi = float(reduced["min"][offsets[0]]), float(reduced["max"][offsets[1]])
            metric.state[name] = None if lo > hi else np.array([lo, hi])
        else:
            size = int(np.prod(np.shape(value)))
            flat = reduced[kind][offsets[0] : offsets[0] + size]
            metric.state[name] = float(flat[0]) if np.ndim(value) == 0 else flat.reshape(np.shape(value)).copy()

    def _off(self, why: str) -> None:
        self.active = False
        log.error("sonde: %s; monitoring is switched off on every rank, training goes on", why)
        self.switch_off()


def _kind(metric: Metric, name: str, reduce: Any) -> str:
    """How a declared state merges across ranks: sum, max, min, summary, range or object (gathered)."""
    if isinstance(metric, Histogram):
        if name == "range":
            return "range"
        if metric.edges is None:  # each rank binned over its own range: the agreed edges start next step
            return "drop"
    for kind in ("sum", "max", "min"):
        if reduce is _REDUCERS[kind]:
            return kind
    if reduce is F.merge_summaries:
        return "summary"
    return "object"


def _pack_summary(pack: _Packing, value: Any, once: bool) -> tuple[int, ...]:
    """A summary as sums (n, n·mean, m2 + n·mean², abs_sum, zeros, NaNs, Infs) and extremes."""
    summary = F.EMPTY_SUMMARY if value is None or once else np.asarray(value, dtype=np.float64)
    n, mean, m2 = summary[N], summary[MEAN], summary[M2]
    offsets = (len(pack.sums), len(pack.mins), len(pack.maxes))
    moments = [n * mean, m2 + n * mean * mean] if n else [0.0, 0.0]
    pack.sums.extend([*(float(summary[i]) for i in _SUMMARY_SUMS), *moments])
    lo, hi = summary[MIN], summary[MAX]
    pack.mins.append(np.inf if np.isnan(lo) else float(lo))
    pack.maxes.append(-np.inf if np.isnan(hi) else float(hi))
    return offsets


def _unpack_summary(reduced: dict[str, np.ndarray], offsets: tuple[int, ...]) -> np.ndarray:
    at_sum, at_min, at_max = offsets
    n, abs_sum, zeros, nans, infs, s1, s2 = reduced["sum"][at_sum : at_sum + 7].tolist()
    if n == 0:
        return F.EMPTY_SUMMARY.copy()
    lo, hi = float(reduced["min"][at_min]), float(reduced["max"][at_max])
    if nans > 0:
        lo = hi = np.nan
    with np.errstate(invalid="ignore", over="ignore"):
        mean = s1 / n
        m2 = s2 - s1 * s1 / n
    out = F.EMPTY_SUMMARY.copy()
    out[[N, MEAN, M2, MIN, MAX, ABS_SUM, ZEROS, NANS, INFS]] = [
        n, mean, m2, lo, hi, abs_sum, zeros, nans, infs]
    return out
