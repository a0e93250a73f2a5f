"""The pure math behind sonde's metrics, callable directly (torchmetrics' ``functional`` twin).

One module per metric family; every public function is re-exported here, so users write
``sonde.functional.summarize(x)``. Device-side functions take a tensor and return small tensors
on the same device without host synchronisation; host-side functions take numpy arrays.
"""

from __future__ import annotations

from sonde.functional.stats import (
    EMPTY_SUMMARY,
    accuracy_counts,
    finish_summary,
    histogram_counts,
    histogram_edges,
    merge_summaries,
    scratch,
    summarize,
    summarize_raw,
    summary_stats,
)

__all__ = [
    "EMPTY_SUMMARY",
    "accuracy_counts",
    "finish_summary",
    "histogram_counts",
    "histogram_edges",
    "merge_summaries",
    "scratch",
    "summarize",
    "summarize_raw",
    "summary_stats",
]
