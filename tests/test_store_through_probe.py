"""Records reach the store through the probe; run names never mix silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sonde
from nets import train_toy
from sonde.errors import RunExistsError


def train(store: str, steps: int, **kwargs: Any) -> None:
    train_toy(steps, store=store, **kwargs)


def test_load_returns_a_tidy_frame_and_arrays_separately(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    train(store, 3, run="a")
    frame = sonde.load(store, run="a")
    assert list(frame.columns) == ["run", "step", "phase", "layer", "topic", "metric", "value"]
    assert sorted(frame.step.unique()) == [0, 1, 2]
    assert frame.value.dtype == np.float64
    arrays = sonde.load(store, run="a", arrays=True)
    hist = arrays[(arrays.metric == "histogram") & (arrays.layer == "0") & (arrays.topic == "weights")]
    assert len(hist) == 3 and all(v.sum() == 12 for v in hist.value)  # 4x3 weights in every histogram


def test_an_existing_run_name_is_refused_unless_resumed(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    train(store, 2, run="a")
    with pytest.raises(RunExistsError, match="pass resume=True to append to it, or choose another run name"):
        train(store, 1, run="a")
    train(store, 2, run="a", resume=True)
    steps = sorted(sonde.load(store, run="a", metrics="loss").step)
    assert steps == [0, 1, 2, 3]


def test_default_run_names_are_unique_per_store(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    train(store, 1)
    train(store, 1)
    assert sorted(sonde.load(store).run.unique()) == ["sequential", "sequential-2"]
