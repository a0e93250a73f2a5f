"""The topic vocabulary (docs/architecture.md#vocabulary): what a probe can capture."""

from __future__ import annotations

__all__ = ["GRADS_AND_UPDATES", "GRAD_TOPICS", "PARAM_TOPICS", "SCHEDULE_TOPIC", "STEP_TOPICS", "TENSOR_TOPICS",
           "TOPICS", "UPDATE_OF"]

#: Per-layer topics carrying a tensor.
TENSOR_TOPICS = (
    "activations",
    "inputs",
    "output_grads",
    "weights",
    "biases",
    "weight_grads",
    "bias_grads",
    "weight_updates",
    "bias_updates",
)
#: Per-step, network-wide topics, fed through ``Probe.log``.
STEP_TOPICS = ("loss", "labels", "outputs")
TOPICS = TENSOR_TOPICS + STEP_TOPICS
#: Topics read off a layer's parameters rather than its forward/backward pass.
PARAM_TOPICS = ("weights", "biases", "weight_grads", "bias_grads", "weight_updates", "bias_updates")
#: The gradients of parameters (their ``norm`` makes the gradient norm the overhead budget watches).
GRAD_TOPICS = ("weight_grads", "bias_grads")
#: The topic of the Records in which the overhead budget says how often each metric is recorded
#: (layer ``""``, metric: the metric's name, value: its interval in steps; :mod:`sonde.budget`).
#: Not a topic a probe captures.
SCHEDULE_TOPIC = "schedule"
#: The parameter topic each update topic is a change of.
UPDATE_OF = {"weight_updates": "weights", "bias_updates": "biases"}
#: A parameter topic's gradient and update topics.
GRADS_AND_UPDATES = {"weights": ("weight_grads", "weight_updates"), "biases": ("bias_grads", "bias_updates")}
