"""``sonde.load``: recorded runs back as a tidy pandas DataFrame."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from sonde.store import Store, open_store

__all__ = ["load"]


def load(
    store: str | Path | Store = "sonde.db",
    run: str | Iterable[str] | None = None,
    *,
    layers: str | Iterable[str] | None = None,
    topics: str | Iterable[str] | None = None,
    metrics: str | Iterable[str] | None = None,
    phase: str | None = None,
    arrays: bool = False,
    messages: bool = False,
) -> pd.DataFrame:
    """Load recorded Records as a DataFrame with columns run, step, phase, layer, topic, metric, value.

    Rows are sorted by run, step, layer, topic, metric. By default only scalar metrics are
    returned (``value`` is float64); ``arrays=True`` returns only the array metrics (histograms,
    spectra), with a float64 ``numpy.ndarray`` in each ``value``.

    Args:
        store: path of an SQLite store, a ``sqlite:``/``postgresql`` URL, or an open Store.
        run: a run name or several; None for every run.
        layers: keep only these layer names (``""`` is the network-wide layer).
        topics: keep only these topics (``weights``, ``activations``, ``loss``, ...).
        metrics: keep only these metrics (``norm``, ``mean``, ...).
        phase: keep only this phase (``train``, ``eval``).
        arrays: return array metrics instead of scalar ones.
        messages: add a ``message`` column: an ``alert``'s readable text (its value is 1.0), ``""``
            for Records without one, e.g. ``sonde.load(path, metrics="alert", messages=True)``.

    Raises:
        StoreError: no store at that path (nothing was recorded there yet) or it cannot be read.
        ConfigError: a run name that is not in the store; the message lists the runs that are.

    Example:
        >>> import sonde
        >>> df = sonde.load("sonde.db", run="mlp-digits", topics="weights", metrics="norm")  # doctest: +SKIP
        >>> df.pivot_table(index="step", columns="layer", values="value").plot()            # doctest: +SKIP
    """
    owned = not isinstance(store, Store)
    opened = open_store(store, create=False) if not isinstance(store, Store) else store
    try:
        return opened.load(run, layers=layers, topics=topics, metrics=metrics, phase=phase, arrays=arrays,
                           messages=messages)
    finally:
        if owned:
            opened.close()
