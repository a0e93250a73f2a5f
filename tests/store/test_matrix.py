"""``Store.matrix``: a metric recorded once per ordered layer pair, read back as a square matrix at one step.

The expected matrices are numpy arrays the test builds and writes as Records itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from sonde.errors import ConfigError
from sonde.records import Record
from sonde.run_info import LayerInfo, RunInfo
from sonde.store import Store

LAYERS = ["conv1", "relu", "fc", "out"]  # forward order; deliberately not alphabetical


def _start(store: Store, name: str = "cka") -> str:
    store.start_run(RunInfo(name, model="M", layers=[LayerInfo(n, "Linear") for n in LAYERS]), resume=False)
    return name


def _records(run: str, step: int, m: np.ndarray, layers: list[str], skip: set[tuple[int, int]] = frozenset(),
             phase: str = "train") -> list[Record]:
    return [Record(run, step, phase, layers[i], "activations", f"cka_matrix:{layers[j]}", float(m[i, j]))
            for i in range(len(layers)) for j in range(len(layers)) if (i, j) not in skip]


def _random_cka(seed: int, n: int) -> np.ndarray:
    a = np.random.default_rng(seed).uniform(0, 1, size=(n, n))
    m = (a + a.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _as_array(values: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def test_matrix_at_latest_and_chosen_step_in_forward_order(any_store: Store) -> None:
    run = _start(any_store)
    mats = {step: _random_cka(step, len(LAYERS)) for step in (0, 100, 200)}
    # Written in a shuffled layer order: the answer must still be in forward order.
    shuffled = [2, 0, 3, 1]
    for step, m in mats.items():
        perm = m[np.ix_(shuffled, shuffled)]
        any_store.write(run, _records(run, step, perm, [LAYERS[i] for i in shuffled]))
    any_store.write(run, [Record(run, 50, "train", "fc", "activations", "zero_frac", 0.5)])  # another metric

    latest = any_store.matrix(run, "activations", "cka_matrix:")
    assert latest["layers"] == LAYERS
    assert latest["steps"] == [0, 100, 200]
    assert latest["step"] == 200
    np.testing.assert_allclose(_as_array(latest["values"]), mats[200], rtol=0, atol=1e-12)

    chosen = any_store.matrix(run, "activations", "cka_matrix:", step=100)
    assert chosen["step"] == 100
    np.testing.assert_allclose(_as_array(chosen["values"]), mats[100], rtol=0, atol=1e-12)
    # A step without a matrix falls back to the latest, never to an empty answer.
    assert any_store.matrix(run, "activations", "cka_matrix:", step=50)["step"] == 200


def test_missing_pairs_and_nan_are_none(any_store: Store) -> None:
    run = _start(any_store)
    m = _random_cka(7, len(LAYERS))
    m[1, 2] = np.nan
    any_store.write(run, _records(run, 10, m, LAYERS, skip={(0, 3), (3, 0)}))
    out = any_store.matrix(run, "activations", "cka_matrix:")
    got = _as_array(out["values"])
    expected = m.copy()
    expected[0, 3] = expected[3, 0] = np.nan
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # NaN positions must match too
    assert out["values"][0][3] is None and out["values"][1][2] is None


def test_phases_are_kept_apart_and_empty_answers(any_store: Store) -> None:
    run = _start(any_store)
    assert any_store.matrix(run, "activations", "cka_matrix:") == {"layers": [], "steps": [], "step": None,
                                                                  "values": []}
    any_store.write(run, _records(run, 5, _random_cka(1, 4), LAYERS, phase="eval"))
    assert any_store.matrix(run, "activations", "cka_matrix:")["steps"] == []
    assert any_store.matrix(run, "activations", "cka_matrix:", phase="eval")["steps"] == [5]


def test_a_pass_that_skipped_a_layer_keeps_the_axis(any_store: Store) -> None:
    run = _start(any_store)
    full = _random_cka(3, 4)
    any_store.write(run, _records(run, 0, full, LAYERS))
    part = _random_cka(4, 3)
    any_store.write(run, _records(run, 1, part, ["conv1", "fc", "out"]))  # "relu" skipped at step 1
    out = any_store.matrix(run, "activations", "cka_matrix:")
    assert out["layers"] == LAYERS and out["step"] == 1
    got = _as_array(out["values"])
    keep = [0, 2, 3]
    np.testing.assert_allclose(got[np.ix_(keep, keep)], part, rtol=0, atol=1e-12)
    assert np.isnan(got[1]).all() and np.isnan(got[:, 1]).all()


def test_bad_arguments_say_what_was_expected(any_store: Store) -> None:
    run = _start(any_store)
    with pytest.raises(ConfigError, match="prefix must be a non-empty"):
        any_store.matrix(run, "activations", "")
    with pytest.raises(ConfigError, match="step must be an integer"):
        any_store.matrix(run, "activations", "cka_matrix:", step="last")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no run 'nope'"):
        any_store.matrix("nope", "activations", "cka_matrix:")
