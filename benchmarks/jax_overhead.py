"""Per-step overhead of ``sonde.jax.probe`` on a Flax NNX model trained with an ``nnx.jit`` step,
against the same loop unmonitored.

Measured side by side in one process, interleaved in rounds: each round trains every variant
once (a fresh model each, same seed, compiled in a warm-up step that is not timed), and a
variant's ratio in that round is its per-step time over the unmonitored loop's in the same
round. ``ratio`` is the median of a variant's ratios over the rounds, ``best`` its fastest round
over the unmonitored loop's fastest (on shared, loaded cores the least disturbed). The step is
timed to completion (``block_until_ready`` on the loss, and for sonde the
``p.log`` that waits for its callbacks), as a loop that logs its loss each step runs.

    python benchmarks/jax_overhead.py [--rounds 5] [--steps 20]

Model: the 4-layer 1024-wide MLP of ``benchmarks/overhead.py``, batch 256. Variants: ``sonde``
(every topic of every layer, default metrics, every step, to a SQLite store: on the CPU the
statistics are taken in the step by sonde's kernel as an XLA custom call) and ``sonde every=10``,
each also with the arrays sent to the host for their statistics (``host``:
``JaxProbe.device_statistics = False``) and with the statistics taken in the step by ``jnp``
reductions (``jnp``: ``JaxProbe.statistics_kernel = False``, the path on accelerators). The
table prints each variant's median ratio to the unmonitored step, side by side. No peer is
measured: the JAX tools we know of log what the user returns from the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import sonde.jax
from sonde.probe.jax import JaxProbe


class MLP(nnx.Module):  # type: ignore[misc]
    def __init__(self, rngs: Any) -> None:
        self.layers = nnx.List([nnx.Linear(1024, 1024, rngs=rngs) for _ in range(3)])
        self.head = nnx.Linear(1024, 10, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


@nnx.jit  # type: ignore[misc]
def train_step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
    def loss_fn(m: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def run(variant: str, steps: int, store: str, r: int) -> float:
    """Seconds per step after one untimed warm-up step."""
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(256, 1024)).astype("float32"), rng.integers(0, 10, 256)
    if variant == "unmonitored":
        train_step(model, optimizer, x, y).block_until_ready()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, x, y).block_until_ready()
        return (time.perf_counter() - start) / steps
    every = 10 if variant.endswith("every=10") else 1
    JaxProbe.device_statistics = {"host": False, "jnp": True}.get(variant.split()[0])
    JaxProbe.statistics_kernel = not variant.startswith("jnp")
    with sonde.jax.probe(model, optimizer=optimizer, run=f"{variant}-{r}", store=store, every=every) as p:
        p.log(loss=train_step(model, optimizer, x, y))
        start = time.perf_counter()
        for _ in range(steps):
            p.log(loss=train_step(model, optimizer, x, y))
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds x {args.steps} timed steps, one process")
    variants = ["unmonitored", "sonde", "sonde every=10", "host", "host every=10", "jnp", "jnp every=10"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "s.db")
        for r in range(args.rounds):
            for variant in variants:
                times[variant].append(run(variant, args.steps, store, r))
    print(f"\n{'variant':<20}{'ms/step':>10}{'ratio':>9}{'best':>9}   ratio per round")
    for variant in variants:
        ratios = [t / u for t, u in zip(times[variant], times["unmonitored"], strict=True)]
        best = min(times[variant]) / min(times["unmonitored"])
        rounds = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{variant:<20}{1000 * statistics.median(times[variant]):>10.1f}{statistics.median(ratios):>8.2f}x"
              f"{best:>8.2f}x   {rounds}")


if __name__ == "__main__":
    main()
