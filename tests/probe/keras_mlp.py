"""The small Keras MLP and the data that the Keras callback tests train, on whichever backend the
importing test module's Keras runs (Keras picks it when first imported; this module imports the
same Keras)."""

from __future__ import annotations

from typing import Any

import numpy as np

LR, BATCH = 0.1, 16


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 3, 64)


def mlp(seed: int = 0) -> Any:
    """Dense ``fc1`` (8 → 16, tanh) then ``fc2`` (16 → 3), compiled with SGD and a from-logits loss."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="fc1"),
                              keras.layers.Dense(3, name="fc2")])
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model: Any, callbacks: Any = None, **kw: Any) -> None:
    """``model.fit`` on :func:`data`, in order, quietly; ``callbacks``: one callback or a list."""
    x, y = data()
    listed = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks is not None else []
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=listed, **kw)
