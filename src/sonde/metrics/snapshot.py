"""``snapshot``: a small picture of a tensor as a Record, for tensor videos (:mod:`sonde.sinks.video`).

Sinks receive Records, never tensors, so a tensor reaches the video sink (or the store, from
which ``sonde record`` renders later) as a Record whose value is a small downsampled copy. On
the training thread ``update`` only stages a bounded device-side reduction (≤ 4096 values, or
≤ 128 × 2048 for a projection); the host does the rest in ``compute`` (offloaded to the probe's
worker where the probe has one):

* a 2-D tensor (a Linear weight, a batch × features activation) is a **heatmap**, average-pooled
  to at most 64 × 64;
* an activation, input or output gradient with 3 or more dimensions is a **PCA projection**:
  each sample (first dimension, at most 128) flattened (and average-pooled to 2048 features),
  centred, and projected on its first two principal components;
* anything else (biases, convolution kernels) is a **sample of values** for a histogram:
  at most 4096 evenly strided elements.

The Record's value is ``[kind, rows, cols, *data]`` (kind 0 heatmap rows × cols, 1 projection
rows × 2, 2 values rows × 1), decoded by :func:`decode_snapshot`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as torch_f

from sonde.metrics.base import Capture, Metric

__all__ = ["HEATMAP", "PROJECTION", "VALUES", "Snapshot", "decode_snapshot"]

HEATMAP, PROJECTION, VALUES = 0, 1, 2
KIND_NAMES = {HEATMAP: "heatmap", PROJECTION: "projection", VALUES: "values"}
SAMPLE_TOPICS = ("activations", "inputs", "output_grads")


def decode_snapshot(value: np.ndarray) -> tuple[int, np.ndarray]:
    """``(kind, array)`` from a snapshot Record's value: a rows × cols array (cols 2 for projections).

    Example:
        >>> decode_snapshot(np.array([0.0, 2, 2, 1, 2, 3, 4]))
        (0, array([[1., 2.],
               [3., 4.]]))
    """
    flat = np.asarray(value, dtype=np.float64)
    if flat.ndim != 1 or flat.size < 3 or int(flat[0]) not in KIND_NAMES:
        raise ValueError(f"expected a snapshot value [kind, rows, cols, *data], got an array of shape {flat.shape}")
    kind, rows, cols = int(flat[0]), int(flat[1]), int(flat[2])
    data = flat[3:]
    if data.size != rows * cols:
        raise ValueError(f"snapshot header says {rows} × {cols} values, the record holds {data.size}")
    return kind, data.reshape(rows, cols)


def _keep_first(first: Any, _later: Any) -> Any:
    return first


class Snapshot(Metric):
    """A downsampled copy of the tensor (heatmap, PCA projection or value sample), one per recorded step.

    Only the first batch of a step is kept (a frame is a picture, not an average). Snapshots are
    arrays of up to 4096 values: choose a few layers and a sparse schedule when storing them.

    Args:
        max_side: heatmaps are pooled to at most ``max_side`` × ``max_side`` (default 64).
        max_samples: projections use at most this many samples (default 128).
        max_values: value samples hold at most this many elements (default 4096).

    Example:
        >>> from sonde.metrics.base import Capture
        >>> m = Snapshot()
        >>> m.update(Capture(torch.arange(6.0).reshape(2, 3), topic="weights"))
        >>> m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
        >>> m.compute()["snapshot"][:3]       # a 2 × 3 heatmap
        array([0., 2., 3.])
    """

    name = "snapshot"
    topics = ("activations", "inputs", "output_grads", "weights", "biases", "weight_grads", "bias_grads",
              "weight_updates", "bias_updates")
    offload = True
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"max_side": (1, 256), "max_samples": (1, 1024),
                                                       "max_values": (1, 65536)}

    def __init__(self, max_side: int = 64, max_samples: int = 128, max_values: int = 4096, **kwargs: Any) -> None:
        self.check_settings(max_side=max_side, max_samples=max_samples, max_values=max_values)
        super().__init__(**kwargs)
        self.max_side = max_side
        self.max_samples = max_samples
        self.max_values = max_values
        self.add_state("frame", default=None, reduce=_keep_first)

    def update(self, capture: Capture) -> None:
        if self.state["frame"] is not None or any(name == "frame" for name, _ in self.staged):
            return  # the step's first batch is its frame
        t = capture.tensor.detach()
        if t.numel() == 0:
            return
        if t.ndim == 2:
            x = t.float()
            if x.shape[0] > self.max_side or x.shape[1] > self.max_side:
                size = (min(x.shape[0], self.max_side), min(x.shape[1], self.max_side))
                x = torch_f.adaptive_avg_pool2d(x[None, None], size)[0, 0]
            kind = HEATMAP
        elif t.ndim >= 3 and capture.topic in SAMPLE_TOPICS:
            x = t[: self.max_samples].reshape(min(t.shape[0], self.max_samples), -1).float()
            features = 2048
            if x.shape[1] > features:
                x = torch_f.adaptive_avg_pool1d(x[:, None, :], features)[:, 0, :]
            kind = PROJECTION
        else:
            flat = t.reshape(-1)
            x = flat[:: max(1, math.ceil(flat.numel() / self.max_values))].float()[:, None]
            kind = VALUES
        header = torch.tensor([kind, x.shape[0], x.shape[1]], dtype=torch.float32, device=x.device)
        self.stage("frame", torch.cat([header, x.reshape(-1)]))

    def compute(self) -> dict[str, Any]:
        frame = self.state["frame"]
        if frame is None:
            return {}
        flat = np.asarray(frame, dtype=np.float64)
        kind, rows, cols = int(flat[0]), int(flat[1]), int(flat[2])
        if kind != PROJECTION:
            return {"snapshot": flat}
        return {"snapshot": np.concatenate([[PROJECTION, rows, 2], project_2d(flat[3:].reshape(rows, cols)).ravel()])}


def project_2d(samples: np.ndarray) -> np.ndarray:
    """Scores of ``samples`` (n × d) on their first two principal components (n × 2; zeros where rank < 2).

    Example:
        >>> project_2d(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]))[:, 0].round(3).tolist()
        [-2.0, -1.0, 3.0]
    """
    centred = samples - samples.mean(axis=0, keepdims=True)
    out = np.zeros((samples.shape[0], 2))
    if samples.shape[0] < 2:
        return out
    # Scores are U·S of the centred matrix: the top eigenvectors of its n × n Gram matrix times the
    # square roots of their eigenvalues (eigh on n ≤ 128 rows is fast and steady; LAPACK's SVD on a
    # busy machine is not).
    eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T)
    k = min(2, eigenvalues.size)
    top = np.argsort(eigenvalues)[::-1][:k]
    scores = eigenvectors[:, top] * np.sqrt(np.clip(eigenvalues[top], 0.0, None))
    # A fixed sign (largest |loading| positive) keeps frames from flipping between steps.
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), range(k)])
    out[:, :k] = scores * np.where(signs == 0, 1, signs)
    return out
