"""``sonde.tensorflow.probe_session`` on a ``tf.compat.v1`` graph (placeholders, a convolution and a
dense layer under variable scopes, ``GradientDescentOptimizer.minimize``) trained with
``session.run``: every topic at every step checked against numpy on tensors the test fetched
itself (its own ``tf.gradients``), the training unchanged, ``every=2`` leaving the user's fetches
untouched at unrecorded steps, ``session.run`` restored on exit, a failure in sonde's part logged
once while the user's results stay intact, evaluation runs in phase ``eval``, the graph view.

TensorFlow's eager mode is process-wide state, so the TF1 half runs once in a child process
(``tf1_session_child.py``) that pickles what it saw; the assertions are here.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

HERE = Path(__file__).parent
LR, BATCH = 0.5, 5  # as in tf1_session_child.py


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tf1") / "result.pkl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, str(HERE / "tf1_session_child.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out, "rb") as file:
        result: dict[str, Any] = pickle.load(file)
    return result


def _value(seen: dict[str, Any], step: int, phase: str, layer: str, topic: str, metric: str) -> float:
    found = [r[5] for r in seen["records"] if r[:5] == (step, phase, layer, topic, metric)]
    assert len(found) == 1, (step, phase, layer, topic, metric, found)
    return float(found[0])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _expected(step: dict[str, Any]) -> dict[tuple[str, str], np.ndarray]:
    """Each (layer, topic)'s tensor at one step, from the replay's own fetches and numpy."""
    conv_w, conv_b, dense_w, dense_b = (np.asarray(v, dtype=np.float64) for v in step["before"])
    x = np.asarray(step["x"], dtype=np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # (batch, 4, 4, 1, 3, 3)
    conv = np.maximum(np.einsum("bhwcij,ijco->bhwo", windows, conv_w) + conv_b, 0)  # the convolution by hand
    flat = conv.reshape(len(x), -1)
    logits = flat @ dense_w + dense_b  # the dense layer by hand
    onehot = np.eye(3)[step["y"]]
    probabilities = _softmax(logits)
    expected = {
        ("model/conv", "inputs"): x, ("model/conv", "activations"): conv, ("model/dense", "inputs"): flat,
        ("model/dense", "activations"): logits,
        ("model/dense", "output_grads"): (probabilities - onehot) / BATCH,  # d mean CE / d logits
        ("model/conv", "output_grads"): step["output_grads"][0],
        ("", "loss"): np.array(-np.log((probabilities * onehot).sum(axis=1)).mean()),
    }
    for position, (layer, kind) in enumerate([("model/conv", "weight"), ("model/conv", "bias"),
                                              ("model/dense", "weight"), ("model/dense", "bias")]):
        expected[(layer, "weights" if kind == "weight" else "biases")] = step["before"][position]
        expected[(layer, f"{kind}_grads")] = step["grads"][position]
        expected[(layer, f"{kind}_updates")] = step["after"][position] - step["before"][position]
    return expected


def test_every_topic_at_every_step_matches_numpy_on_the_fetched_tensors(seen: dict[str, Any]) -> None:
    assert seen["layers"] == ["model/conv", "model/dense"]
    assert sorted({r[0] for r in seen["records"] if r[1] == "train"}) == [0, 1, 2, 3]
    for k, step in enumerate(seen["replay"]):
        by_hand = _expected(step)
        np.testing.assert_allclose(by_hand[("model/conv", "activations")], step["conv"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(by_hand[("model/dense", "activations")], step["logits"], rtol=1e-5, atol=1e-6)
        for (layer, topic), value in by_hand.items():
            if topic == "loss":
                assert _value(seen, k, "train", "", "loss", "loss") == pytest.approx(float(value), rel=1e-5)
                continue
            for metric, reference in (("mean", float(np.mean(value))), ("norm", float(np.linalg.norm(value)))):
                got = _value(seen, k, "train", layer, topic, metric)
                assert got == pytest.approx(reference, rel=1e-4, abs=1e-6), (k, layer, topic, metric)


def test_updates_are_the_sgd_step_of_the_gradients(seen: dict[str, Any]) -> None:
    for k, step in enumerate(seen["replay"]):
        for position, (layer, kind) in enumerate([("model/conv", "weight"), ("model/conv", "bias"),
                                                  ("model/dense", "weight"), ("model/dense", "bias")]):
            np.testing.assert_allclose(step["after"][position] - step["before"][position],
                                       -LR * step["grads"][position], rtol=1e-4, atol=1e-6)
            got = _value(seen, k, "train", layer, f"{kind}_updates", "norm")
            assert got == pytest.approx(LR * float(np.linalg.norm(step["grads"][position])), rel=1e-4)


def test_the_probe_leaves_training_unchanged(seen: dict[str, Any]) -> None:
    np.testing.assert_array_equal(seen["probed_losses"], [float(s["loss"]) for s in seen["replay"]])


def test_a_run_without_the_training_op_is_evaluation_at_the_step_whose_weights_it_used(seen: dict[str, Any]) -> None:
    evals = {r[0] for r in seen["records"] if r[1] == "eval"}
    assert evals == {4}  # after the 4 training steps (0..3)
    assert _value(seen, 4, "eval", "", "loss", "loss") == pytest.approx(seen["eval_loss"], rel=1e-6)
    # the loss run and the logits run use the same batch and weights: merged, the mean is one run's
    got = _value(seen, 4, "eval", "model/dense", "activations", "mean")
    assert got == pytest.approx(float(np.mean(seen["eval_logits"])), rel=1e-5)
    assert not [r for r in seen["records"] if r[1] == "eval" and r[3] in ("weights", "weight_grads", "output_grads")]


def test_unrecorded_steps_pass_the_users_fetches_untouched(seen: dict[str, Any]) -> None:
    # every=2: steps 0 and 2 append sonde's fetches to the user's, steps 1 and 3 are the user's own object
    assert seen["spy_same_object"] == [False, True, False, True]
    assert seen["spy_extra_count"][1] == seen["spy_extra_count"][3] == 0
    assert seen["spy_extra_count"][0] == seen["spy_extra_count"][2] > 0
    # the recorded steps have every topic, the loss included though the user fetched only the training op
    recorded = seen["every_records"]
    assert {step for step, _, _ in recorded} == {0, 2}
    for step in (0, 2):
        topics = {(layer, topic) for k, layer, topic in recorded if k == step}
        assert ("", "loss") in topics and ("model/dense", "output_grads") in topics
        assert ("model/conv", "weight_updates") in topics and ("model/conv", "inputs") in topics


def test_session_run_is_restored_on_exit(seen: dict[str, Any]) -> None:
    assert seen["run_patched"] and seen["run_restored"]
    assert seen["spy_restored"]  # a run the user had set on the session is put back, not deleted


def test_a_failure_in_sonde_leaves_the_run_results_intact_and_is_logged_once(seen: dict[str, Any]) -> None:
    assert len(seen["failure_messages"]) == 1, seen["failure_messages"]
    assert [float(r["loss"]) for r in seen["failing_results"]] == seen["probed_losses"]
    assert all(r["train"] is None for r in seen["failing_results"])
    for got, want in zip(seen["failing_after"], seen["replay"][-1]["after"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_graph_view_shows_the_scopes_and_the_flow_between_them(seen: dict[str, Any]) -> None:
    (graph,) = seen["graphs"]
    nodes = {n["name"]: n for n in graph["nodes"]}
    assert set(nodes) == {"input.x", "input.y", "model/conv", "model/dense", "output"}
    assert nodes["model/conv"]["params"] == {"kernel": [3, 3, 1, 2], "bias": [2]}
    assert nodes["model/conv"]["output_shapes"] == [[-1, 4, 4, 2]]
    assert nodes["model/dense"]["num_params"] == 32 * 3 + 3
    assert sorted(map(tuple, graph["edges"])) == [("input.x", "model/conv"), ("input.y", "output"),
                                                   ("model/conv", "model/dense"), ("model/dense", "output")]


def test_a_finalized_graph_records_weights_and_gradients_and_says_what_it_cannot(seen: dict[str, Any]) -> None:
    finalized = seen["finalized"]
    assert len(finalized["warnings"]) == 1
    got = {(step, layer, topic): value for step, layer, topic, value in finalized["records"]}
    # no output_grads and no updates: both need ops the finalized graph cannot take
    assert {topic for _, _, topic in got} == {"activations", "inputs", "weights", "biases",
                                              "weight_grads", "bias_grads"}
    for k, step in enumerate(finalized["fetched"]):
        for position, (topic, grad_topic) in enumerate([("weights", "weight_grads"), ("biases", "bias_grads")]):
            assert got[(k, "fc", topic)] == pytest.approx(float(np.linalg.norm(step["before"][position])), rel=1e-5)
            assert got[(k, "fc", grad_topic)] == pytest.approx(float(np.linalg.norm(step["grads"][position])),
                                                               rel=1e-5)


def test_probe_session_refuses_what_is_not_a_session_and_unknown_keywords() -> None:
    from sonde.errors import ConfigError, ProbeError
    from sonde.tensorflow import probe_session

    with pytest.raises(ProbeError, match="expects a tf.compat.v1.Session"):
        probe_session(object(), store=None)
    with pytest.raises(ConfigError, match="evry"):
        probe_session(object(), evry=2)  # type: ignore[call-arg]
