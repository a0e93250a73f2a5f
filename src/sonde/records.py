"""The Record: the one currency between metrics and everything downstream.

Sinks, the store and (later) the server read only Records; nothing downstream knows which
framework produced them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["NETWORK", "Record", "tag"]

#: Layer name used for per-step, network-wide topics (``loss``, ``labels``, ``outputs``).
NETWORK = ""


class Record(NamedTuple):
    """One value of one metric of one topic of one layer at one step.

    ``value`` is a float for scalar metrics and a 1-D float64 array for non-scalar ones
    (``histogram`` counts, ``histogram_edges``). ``message`` is a readable text for the few
    Records that carry one: an ``alert`` has value 1.0 and says what is wrong in ``message``
    (``""`` everywhere else).

    Example:
        >>> r = Record("mlp", 3, "train", "fc1", "weights", "norm", 1.5)
        >>> tag(r)
        'fc1/weights/norm'
    """

    run: str
    step: int
    phase: str
    layer: str
    topic: str
    metric: str
    value: float | np.ndarray
    message: str = ""

    @property
    def is_scalar(self) -> bool:
        return not isinstance(self.value, np.ndarray)


def tag(record: Record) -> str:
    """The ``layer/topic/metric`` tag used by TensorBoard, CSV headers and the console.

    Network-wide records drop the empty layer, and a metric named like its topic
    (``loss``) is written once: ``loss``, ``outputs/train_accuracy``.
    """
    parts = [record.layer] if record.layer != NETWORK else []
    parts.append(record.topic)
    if record.metric != record.topic:
        parts.append(record.metric)
    name = "/".join(parts)
    return name if record.phase == "train" else f"{record.phase}/{name}"
