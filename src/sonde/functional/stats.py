"""The pure math behind sonde's metrics, callable directly (torchmetrics' ``functional`` twin).

Device-side functions take a tensor and return small tensors on the same device, without any
host synchronisation; host-side functions take numpy arrays.

A *summary* is a length-9 float64 vector describing a tensor::

    [n, mean, m2, min, max, abs_sum, zeros, nans, infs]

where ``m2`` is the sum of squared deviations from the mean. Summaries merge exactly (Chan et
al.'s parallel variance), so the same state serves one batch, an epoch, or several processes.
Variance is the population variance (ddof=0), unlike Ikkuna's unbiased ``VarianceSubscriber``.

Example:
    >>> import torch
    >>> s = summarize(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    >>> stats = summary_stats(s)
    >>> float(stats["mean"]), float(stats["var"]), float(stats["zero_frac"])
    (1.5, 1.25, 0.25)
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

__all__ = [
    "EMPTY_SUMMARY",
    "accuracy_counts",
    "finish_summary",
    "histogram_counts",
    "histogram_edges",
    "merge_summaries",
    "summarize",
    "summarize_raw",
    "summary_stats",
]

N, MEAN, M2, MIN, MAX, ABS_SUM, ZEROS, NANS, INFS = range(9)
EMPTY_SUMMARY = np.array([0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0, 0.0, 0.0])


_scratch = threading.local()


def scratch(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable buffer shaped like flat ``like`` (per thread, device and dtype).

    Fresh multi-megabyte allocations on the CPU are served by mmap and pay a page fault per
    4 KiB on first touch, which costs more than the arithmetic; reusing one buffer avoids it.
    """
    dtype = dtype or like.dtype
    buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    key = (like.device, dtype)
    buffer = buffers.get(key)
    n = like.numel()
    if buffer is None or buffer.numel() < n:
        buffer = torch.empty(n, dtype=dtype, device=like.device)
        buffers[key] = buffer
    return buffer[:n]


def _flat_float(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1)
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()  # reductions in float32 at least
    return x


def summarize_raw(x: torch.Tensor) -> tuple[torch.Tensor | float, ...]:
    """The hot-path reduction: raw partial sums of ``x`` as 0-d tensors on its device, no host sync.

    Returns ``(n, shift, s1, s2, min, max, abs_sum, nonzeros, nans, infs)`` where ``s1``/``s2``
    are the sum and sum of squares of ``x - shift``; :func:`finish_summary` turns the host copy
    into a summary. Sums are taken around a shift (the first element, when finite) so the
    variance keeps its precision when the mean is large against the spread. Leaving the
    partials unstacked saves a dozen tiny kernel launches per tensor; they are gathered in the
    step's one batched transfer.
    """
    v = _flat_float(x)
    n = v.numel()
    if n == 0:
        return (0.0,)
    first = v[0]
    shift = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    centred = torch.sub(v, shift, out=scratch(v))
    s1, s2 = centred.sum(), torch.dot(centred, centred)
    lo, hi = torch.aminmax(v)
    if v.device.type == "cpu" and math.isfinite(float(lo)) and math.isfinite(float(hi)):
        # Reading a CPU scalar costs no device sync; finite extremes mean no NaN and no Inf
        # (aminmax propagates NaN), which saves two passes over the data on the common path.
        nans: torch.Tensor | float = 0.0
        infs: torch.Tensor | float = 0.0
    else:
        nans = torch.isnan(v).sum()
        infs = torch.isinf(v).sum()
    abs_sum = torch.abs(v, out=scratch(v)).sum()  # the buffer is free again: s1 and s2 are taken
    return (float(n), shift, s1, s2, lo, hi, abs_sum, torch.count_nonzero(v), nans, infs)


def finish_summary(raw: np.ndarray) -> np.ndarray:
    """Summary from the host copy of :func:`summarize_raw`'s partials (float64 arithmetic)."""
    if raw[0] == 0:
        return EMPTY_SUMMARY.copy()
    n, shift, s1, s2, lo, hi, abs_sum, nonzeros, nans, infs = raw.tolist()
    with np.errstate(invalid="ignore", over="ignore"):
        mean = shift + s1 / n
        m2 = s2 - s1 * s1 / n
    return np.array([n, mean, m2, lo, hi, abs_sum, n - nonzeros, nans, infs])


def summarize(x: torch.Tensor) -> np.ndarray:
    """Summary (float64 numpy vector) of all elements of ``x``; reads the result back to the host."""
    raw = summarize_raw(x)
    return finish_summary(np.array([float(v) for v in raw]))


def merge_summaries(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two summaries exactly (Chan et al. 1979 for mean and m2)."""
    na, nb = a[N], b[N]
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = b[MEAN] - a[MEAN]
    out = a + b  # abs_sum, zeros, nans, infs add
    out[N] = n
    out[MEAN] = a[MEAN] + delta * nb / n
    out[M2] = a[M2] + b[M2] + delta * delta * na * nb / n
    out[MIN] = np.nan if np.isnan(a[MIN]) or np.isnan(b[MIN]) else min(a[MIN], b[MIN])
    out[MAX] = np.nan if np.isnan(a[MAX]) or np.isnan(b[MAX]) else max(a[MAX], b[MAX])
    return out


def summary_stats(s: np.ndarray) -> dict[str, float]:
    """The tensor statistics (docs/metrics.md#tensor-statistics) from a summary (population variance)."""
    n, mean, m2, lo, hi, abs_sum, zeros, nans, infs = np.asarray(s, dtype=np.float64).tolist()
    if n == 0:
        return {}
    var = max(m2, 0.0) / n if math.isfinite(m2) else math.nan
    if nans > 0:
        norm = math.nan
    elif infs > 0:
        norm = math.inf
    else:
        norm = math.sqrt(max(m2, 0.0) + n * mean * mean)
    return {
        "mean": mean,
        "var": var,
        "std": math.sqrt(var) if not math.isnan(var) else math.nan,
        "min": lo,
        "max": hi,
        "abs_mean": abs_sum / n,
        "norm": norm,
        "zero_frac": zeros / n,
        "nonfinite_frac": (nans + infs) / n,
    }


def histogram_edges(lo: float, hi: float, bins: int) -> np.ndarray | None:
    """Equal-width edges over ``[lo, hi]``, or None when the range is empty or not finite."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    return np.linspace(lo, hi, bins + 1)


def histogram_counts(
    x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, bins: int, *, nan_free: bool = False
) -> torch.Tensor:
    """Counts of ``x`` in ``bins`` equal-width bins over ``[lo, hi]``, on ``x``'s device.

    Values below ``lo`` count in the first bin, values above ``hi`` (and ±Inf) in the last;
    NaN is not counted. ``lo``/``hi`` may be 0-d tensors on the device (no host sync).
    ``nan_free=True`` promises there is no NaN and skips the check.
    """
    v = _flat_float(x)
    scale = bins / (hi - lo)
    position = torch.sub(v, lo, out=scratch(v)).mul_(scale).clamp_(0, bins - 1)
    if v.device.type == "cpu":
        # Clamping bounds every number, so a non-finite sum means NaN, which cannot be binned.
        if not nan_free and not math.isfinite(float(position.sum())):
            position = position[~torch.isnan(position)]
        index = scratch(position, torch.uint8 if bins <= 256 else torch.int64).copy_(position)
        return torch.bincount(index, minlength=bins)
    # On accelerators bincount would sync to size its output; index_add_ does not.
    valid = ~torch.isnan(position)
    index = torch.nan_to_num(position, nan=0.0).to(torch.int64)
    return torch.zeros(bins, dtype=torch.float64, device=v.device).index_add_(0, index, valid.to(torch.float64))


def accuracy_counts(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[correct, total]`` (float64, device) for class predictions against integer labels.

    ``outputs`` of shape (B, C) or (B, ..., C) are scored by argmax over the last dimension;
    (B,) or (B, 1) are binary logits (positive means class 1). Labels < 0 (padding, such as
    ``ignore_index=-100``) are left out.
    """
    out = outputs.detach()
    lab = labels.detach().reshape(-1)
    if out.dim() == 1 or (out.dim() == 2 and out.shape[-1] == 1):
        pred = (out.reshape(-1) > 0).to(lab.dtype)
    else:
        pred = out.argmax(dim=-1).reshape(-1)
    if pred.numel() != lab.numel():
        raise ValueError(
            f"outputs predict {pred.numel()} labels but {lab.numel()} labels were logged "
            f"(outputs shape {tuple(outputs.shape)}, labels shape {tuple(labels.shape)})"
        )
    keep = lab >= 0
    correct = ((pred == lab) & keep).sum()
    return torch.stack([correct, keep.sum()]).to(torch.float64)
