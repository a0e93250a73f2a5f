"""Metric lookup by name through the ``sonde.metrics`` entry-point group.

sonde's own metrics are registered in its ``pyproject.toml`` exactly as a third-party
package registers its own, so a plugin's metric is used by name like a built-in one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib.metadata import entry_points

from sonde.errors import ConfigError
from sonde.metrics.base import Metric

__all__ = ["DEFAULT_METRICS", "registry", "resolve_metrics"]

DEFAULT_METRICS = (
    "mean",
    "std",
    "var",
    "min",
    "max",
    "abs_mean",
    "norm",
    "zero_frac",
    "nonfinite_frac",
    "histogram",
    "update_ratio",
    "loss",
    "train_accuracy",
    "alerts",
)


@functools.cache
def registry() -> dict[str, type[Metric]]:
    """All metric classes registered under ``sonde.metrics``, by name."""
    found: dict[str, type[Metric]] = {}
    for ep in entry_points(group="sonde.metrics"):
        if ep.name in found:
            continue
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Metric)):
            raise ConfigError(f"entry point sonde.metrics:{ep.name} = {ep.value} is not a sonde Metric subclass")
        found[ep.name] = cls
    if "mean" not in found:
        raise ConfigError(
            "sonde's built-in metrics are not registered: is sonde installed (pip install -e .)? "
            "Running from a source tree without installing it leaves its entry points undiscovered."
        )
    return found


def resolve_metrics(metrics: Sequence[str | Metric] | None) -> list[Metric]:
    """Metric templates from names and/or configured instances.

    Pulls in the metrics that others require (``update_ratio`` needs ``norm``) and combines
    metrics that share their work (``mean`` and ``std`` become one ``TensorStats``).
    """
    table = registry()
    chosen: list[Metric] = []
    for item in DEFAULT_METRICS if metrics is None else metrics:
        if isinstance(item, Metric):
            chosen.append(item)
        elif isinstance(item, str):
            if item not in table:
                raise ConfigError(f"unknown metric {item!r}; registered metrics are: {', '.join(sorted(table))}")
            chosen.append(table[item]())
        else:
            raise ConfigError(f"metrics= expects metric names or sonde.metrics.Metric instances, got {item!r}")
    emitted = {name for metric in chosen for name in metric.emits()}
    for metric in list(chosen):
        for needed in metric.requires:
            if needed not in emitted:
                emitted.add(needed)
                chosen.append(table[needed]())
    combined: list[Metric] = []
    for metric in chosen:
        for i, existing in enumerate(combined):
            if not _same_timing(existing, metric):
                continue  # shared work only between metrics that compute and reset together
            merged = existing.combine(metric)
            if merged is not None:
                merged.compute_schedule, merged.reset_policy = existing.compute_schedule, existing.reset_policy
                combined[i] = merged
                break
        else:
            combined.append(metric)
    return combined


def _same_timing(a: Metric, b: Metric) -> bool:
    """Whether two metrics compute and reset at the same steps (``every(10)`` equals ``every(10)``)."""
    sa, sb = a.compute_schedule, b.compute_schedule
    same = sa is sb or (type(sa) is type(sb) and repr(sa) == repr(sb))
    return same and a.reset_policy == b.reset_policy
