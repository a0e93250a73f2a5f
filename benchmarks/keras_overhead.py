"""Per-step overhead of ``sonde.keras.SondeCallback`` in Keras 3 ``model.fit`` (TensorFlow backend),
against an unmonitored fit and against Keras's own ``TensorBoard(histogram_freq=1)``.

Measured side by side in one process, interleaved in rounds: each round fits every variant once
(a fresh model each, same seed), and a variant's ratio in that round is its per-step time over
the unmonitored fit's in the same round. A step's time is the wall time of the timed epochs
(after one warm-up epoch that compiles the functions) over their steps. The table prints the
median per-step time and the median of the per-round ratios.

    python benchmarks/keras_overhead.py [--rounds 5] [--steps 20] [--models mlp cnn] [--fresh]

``--fresh`` fits every (round, variant) in a new Python process, as a user's script runs: in one
process the variants' models, compiled functions and threads pile up and slow each other unevenly
(sonde's MLP step measured 35 ms alone and 49-61 ms interleaved with the others).

Variants: ``sonde`` (every topic of every layer, default metrics, every step, to a SQLite
store), ``sonde every=10``, and ``TensorBoard(histogram_freq=1, update_freq="batch")`` (Keras's
own per-layer view: histograms of the weights, once per epoch, and scalars every batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import sonde.keras


def mlp() -> tuple[Any, np.ndarray, np.ndarray]:
    """The 4-layer 1024-wide MLP of ``benchmarks/overhead.py``, batch 256."""
    layers = [keras.Input((1024,))] + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(256, 1024)).astype("float32"), rng.integers(0, 10, 256)


def cnn() -> tuple[Any, np.ndarray, np.ndarray]:
    """The 3-conv CNN of ``benchmarks/overhead.py``, batch 64 of 32×32×3."""
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(64, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 64)


MODELS: dict[str, Callable[[], tuple[Any, np.ndarray, np.ndarray]]] = {"mlp": mlp, "cnn": cnn}


class EpochTimes(keras.callbacks.Callback):  # type: ignore[misc]
    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.times = [*getattr(self, "times", []), time.perf_counter() - self.start]


def variants(tmp: str) -> dict[str, Callable[[int], list[Any]]]:
    return {
        "unmonitored": lambda r: [],
        "sonde": lambda r: [sonde.keras.SondeCallback(run=f"sonde-{r}", store=os.path.join(tmp, "s.db"))],
        "sonde every=10": lambda r: [sonde.keras.SondeCallback(run=f"every-{r}", store=os.path.join(tmp, "s.db"),
                                                               every=10)],
        "TensorBoard(histogram_freq=1)": lambda r: [keras.callbacks.TensorBoard(
            os.path.join(tmp, f"tb-{r}"), histogram_freq=1, update_freq="batch")],
    }


def fit(make: Callable[[], tuple[Any, np.ndarray, np.ndarray]], callbacks: list[Any], steps: int,
        epochs: int = 3) -> float:
    """Seconds per step over the epochs after the first (which compiles)."""
    keras.utils.set_random_seed(0)
    model, x, y = make()
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batch = len(x)
    xs, ys = np.concatenate([x] * steps), np.concatenate([y] * steps)
    timer = EpochTimes()
    model.fit(xs, ys, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[*callbacks, timer])
    return sum(timer.times[1:]) / ((epochs - 1) * steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch (3 epochs, the first untimed)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
    parser.add_argument("--fresh", action="store_true", help="each variant of each round in a new process")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "VARIANT", "ROUND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            name, variant, r = args.child
            print(fit(MODELS[name], variants(tmp)[variant](int(r)), args.steps))
        return
    where = "each fit in a fresh process" if args.fresh else "one process"
    print(f"keras {keras.__version__} ({keras.backend.backend()}), {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds x 2 timed epochs of {args.steps} steps, {where}")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            table = variants(tmp)
            times: dict[str, list[float]] = {v: [] for v in table}
            ratios: dict[str, list[float]] = {v: [] for v in table}
            for r in range(args.rounds):
                for variant, callbacks in table.items():
                    if args.fresh:
                        command = [sys.executable, __file__, "--child", name, variant, str(r),
                                   "--steps", str(args.steps)]
                        done = subprocess.run(command, capture_output=True, text=True, check=True)
                        times[variant].append(float(done.stdout.strip().splitlines()[-1]))
                    else:
                        times[variant].append(fit(MODELS[name], callbacks(r), args.steps))
                for variant in table:
                    ratios[variant].append(times[variant][-1] / times["unmonitored"][-1])
            print(f"\n{name}")
            print(f"{'variant':<32}{'ms/step':>10}{'ratio':>9}")
            for variant in table:
                print(f"{variant:<32}{1000 * statistics.median(times[variant]):>10.1f}"
                      f"{statistics.median(ratios[variant]):>8.2f}x")


if __name__ == "__main__":
    main()
