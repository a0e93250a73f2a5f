"""The pure math behind sonde's metrics, callable directly (torchmetrics' ``functional`` twin).

One module per metric family; every public function is re-exported here, so users write
``sonde.functional.summarize(x)``. Device-side functions take a tensor and return small tensors
on the same device without host synchronisation; host-side functions take numpy arrays.
"""

from __future__ import annotations

from sonde.functional.saturation import (
    covariance_from_sums,
    covariance_sums,
    eigenvalues,
    feature_rows,
    intrinsic_dimension,
    nystrom_eigenvalues,
    saturation,
    sketch_sums,
)
from sonde.functional.similarity import MinibatchCKA, as_features, cka, gram, hsic_unbiased, svcca
from sonde.functional.spectral import condition_number, spectral_norm
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
from sonde.functional.tasks import (
    ClusterScores,
    cluster_mi,
    kmeans,
    macro_f1,
    mutual_info_scores,
    probe_f1,
    stratified_split,
    task_samples,
)

__all__ = [
    "EMPTY_SUMMARY",
    "ClusterScores",
    "MinibatchCKA",
    "accuracy_counts",
    "as_features",
    "cka",
    "cluster_mi",
    "condition_number",
    "covariance_from_sums",
    "covariance_sums",
    "eigenvalues",
    "feature_rows",
    "finish_summary",
    "gram",
    "histogram_counts",
    "histogram_edges",
    "hsic_unbiased",
    "intrinsic_dimension",
    "kmeans",
    "macro_f1",
    "merge_summaries",
    "mutual_info_scores",
    "nystrom_eigenvalues",
    "probe_f1",
    "saturation",
    "scratch",
    "sketch_sums",
    "spectral_norm",
    "stratified_split",
    "summarize",
    "summarize_raw",
    "summary_stats",
    "svcca",
    "task_samples",
]
