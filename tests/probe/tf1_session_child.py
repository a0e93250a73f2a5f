"""The TF1 half of ``test_tensorflow_session.py``, run in a child process (``python tf1_session_child.py OUT``):
eager execution is switched off process-wide, so no other test may share this interpreter.

It trains a small ``tf.compat.v1`` graph (a convolution and a dense layer under variable scopes,
``GradientDescentOptimizer.minimize``) with the probe, replays the same steps by hand from the
same initial values fetching every tensor itself (``tf.gradients`` written here), and pickles
both to OUT for the parent to compare. Nothing is asserted here; the parent does.
"""

from __future__ import annotations

import logging
import pickle
import sys
from typing import Any

import numpy as np
import tensorflow as tf

from collect import Collect

tf.compat.v1.disable_eager_execution()
v1 = tf.compat.v1
LR, STEPS, BATCH = 0.5, 4, 5


class GraphSink(Collect):
    def __init__(self) -> None:
        super().__init__()
        self.graphs: list[dict[str, Any]] = []

    def graph(self, graph: dict[str, Any]) -> None:
        self.graphs.append(graph)


def build() -> dict[str, Any]:
    v1.set_random_seed(0)
    x = v1.placeholder(tf.float32, [None, 6, 6, 1], name="x")
    y = v1.placeholder(tf.int32, [None], name="y")
    with v1.variable_scope("model"):
        with v1.variable_scope("conv"):
            kernel = v1.get_variable("kernel", [3, 3, 1, 2])
            bias = v1.get_variable("bias", [2], initializer=v1.random_normal_initializer(stddev=0.1))
            conv = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=1, padding="VALID") + bias)
        flat = tf.reshape(conv, [-1, 4 * 4 * 2])
        with v1.variable_scope("dense"):
            w = v1.get_variable("kernel", [32, 3])
            b = v1.get_variable("bias", [3], initializer=v1.random_normal_initializer(stddev=0.1))
            logits = tf.matmul(flat, w) + b
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits), name="loss")
    train = v1.train.GradientDescentOptimizer(LR).minimize(loss)
    return {"x": x, "y": y, "conv": conv, "flat": flat, "logits": logits, "loss": loss, "train": train,
            "variables": {"model/conv": (kernel, bias), "model/dense": (w, b)}}


def batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(BATCH, 6, 6, 1)).astype("float32"), rng.integers(0, 3, BATCH)) for _ in range(STEPS)]


def replay(sess: Any, g: dict[str, Any], initial: list[np.ndarray]) -> list[dict[str, Any]]:
    """The same steps by hand: per step, every tensor fetched directly (gradients made here)."""
    variables = [v for pair in g["variables"].values() for v in pair]
    for variable, value in zip(variables, initial, strict=True):
        variable.load(value, sess)
    output_grads = tf.gradients(g["loss"], [g["conv"], g["logits"]])
    var_grads = tf.gradients(g["loss"], variables)
    steps = []
    for xb, yb in batches():
        feed = {g["x"]: xb, g["y"]: yb}
        fetched = sess.run({"conv": g["conv"], "flat": g["flat"], "logits": g["logits"], "loss": g["loss"],
                            "output_grads": output_grads, "before": variables, "grads": var_grads}, feed)
        sess.run(g["train"], feed)
        fetched["after"] = sess.run(variables)
        fetched["x"], fetched["y"] = xb, yb
        steps.append(fetched)
    return steps


def finalized_momentum(messages: list[str]) -> dict[str, Any]:
    """A finalized graph (as a MonitoredSession's) trained with momentum: weights and gradients are
    recorded, output_grads and updates (which need new ops) are not, and a warning says so. The
    user's own fetches include the gradients (made before finalizing), to compare in the same run."""
    import sonde.tensorflow

    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        with v1.variable_scope("fc"):
            w = v1.get_variable("kernel", [4, 2])
            b = v1.get_variable("bias", [2])
            out = tf.tanh(tf.matmul(x, w) + b)
        loss = tf.reduce_mean(tf.square(out))
        grads = tf.gradients(loss, [w, b])
        train = v1.train.MomentumOptimizer(0.1, momentum=0.9).minimize(loss)
        init = v1.global_variables_initializer()
    graph.finalize()
    sink = Collect()
    messages.clear()
    rng = np.random.default_rng(2)
    fetched = []
    with v1.Session(graph=graph) as sess:
        sess.run(init)
        with sonde.tensorflow.probe_session(sess, loss=loss, store=None, sinks=[sink], metrics=["norm"]):
            for _ in range(2):
                xb = rng.normal(size=(8, 4)).astype("float32")
                before = sess.run([w, b])
                _, got = sess.run([train, grads], {x: xb})
                fetched.append({"before": before, "grads": got})
    return {"records": [(r.step, r.layer, r.topic, float(r.value)) for r in sink.records if r.metric == "norm"],
            "fetched": fetched, "warnings": [m for m in messages if "finalized" in m]}


def main(out: str) -> None:
    import sonde.tensorflow
    from sonde.probe.tensorflow import SessionProbe

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("sonde").addHandler(Keep())
    g = build()
    result: dict[str, Any] = {}
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        variables = [v for pair in g["variables"].values() for v in pair]
        initial = sess.run(variables)

        # every step recorded, then one evaluation run
        sink = GraphSink()
        losses = []
        with sonde.tensorflow.probe_session(sess, loss=g["loss"], store=None, sinks=[sink],
                                            metrics=["mean", "norm", "loss"]) as probe:
            result["run_patched"] = "run" in sess.__dict__
            result["layers"] = list(probe.scopes)
            for xb, yb in batches():
                _, loss_value = sess.run([g["train"], g["loss"]], {g["x"]: xb, g["y"]: yb})
                losses.append(float(loss_value))
            eval_x, eval_y = batches()[0]
            result["eval_loss"] = float(sess.run(g["loss"], {g["x"]: eval_x, g["y"]: eval_y}))
            result["eval_logits"] = sess.run(g["logits"], {g["x"]: eval_x})
        result["run_restored"] = "run" not in sess.__dict__
        result["records"] = [(r.step, r.phase, r.layer, r.topic, r.metric, float(r.value)) for r in sink.records
                             if np.ndim(r.value) == 0]
        result["graphs"] = sink.graphs
        result["probed_losses"] = losses
        result["replay"] = replay(sess, g, initial)

        # every=2: the real session.run sees the user's own fetches at the unrecorded steps
        for variable, value in zip(variables, initial, strict=True):
            variable.load(value, sess)
        seen: list[Any] = []
        real = v1.Session.run

        def spy(fetches: Any, feed_dict: Any = None, options: Any = None, run_metadata: Any = None) -> Any:
            seen.append(fetches)
            return real(sess, fetches, feed_dict, options, run_metadata)

        sess.run = spy
        given = []
        every_sink = Collect()
        with sonde.tensorflow.probe_session(sess, loss=g["loss"], store=None, sinks=[every_sink], every=2,
                                            metrics=["mean", "loss"]):
            for xb, yb in batches():
                fetches = [g["train"]]  # the training op alone: the loss is not among the user's fetches
                given.append(fetches)
                sess.run(fetches, {g["x"]: xb, g["y"]: yb})
        result["every_records"] = sorted({(r.step, r.layer, r.topic) for r in every_sink.records})
        result["spy_same_object"] = [seen_fetches is user for seen_fetches, user in zip(seen, given, strict=True)]
        result["spy_extra_count"] = [len(f[1]) if isinstance(f, tuple) else 0 for f in seen]
        result["spy_restored"] = sess.__dict__.get("run") is spy
        del sess.run

        # a failure inside sonde's part: the user's results as without the probe, one log message
        for variable, value in zip(variables, initial, strict=True):
            variable.load(value, sess)

        def broken(self: Any, *args: Any) -> None:
            raise RuntimeError("sonde test: publishing breaks")

        working = SessionProbe._publish
        SessionProbe._publish = broken  # type: ignore[method-assign]
        messages.clear()
        failing = []
        with sonde.tensorflow.probe_session(sess, loss=g["loss"], store=None, sinks=[Collect()], metrics=["mean"]):
            for xb, yb in batches():
                failing.append(sess.run({"loss": g["loss"], "train": g["train"]}, {g["x"]: xb, g["y"]: yb}))
        SessionProbe._publish = working  # type: ignore[method-assign]
        result["failing_results"] = failing
        result["failing_after"] = sess.run(variables)
        result["failure_messages"] = [m for m in messages if "sonde test: publishing breaks" in m]
    result["finalized"] = finalized_momentum(messages)
    with open(out, "wb") as file:
        pickle.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1])
