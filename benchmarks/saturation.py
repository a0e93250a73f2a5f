"""Cost of saturation monitoring against an unmonitored loop and against Delve, side by side.

Part 1: the 4×1024 MLP of ``overhead.py`` (batch 256, SGD with momentum), saturation on every
Linear layer (the layers Delve tracks), its covariance updated every step and the value computed
every 10th step (default ``precision="float32"``: float32 products accumulated in float64,
float32 eigenvalues; and ``precision="float64"``); the covariance updates alone (the training
thread's share, timed without the final values computed at close); Delve 0.1.50's
``SaturationTracker`` on the same model with ``add_saturations()`` every 10th step. Time per
step is the wall time of the whole loop, *including* closing the monitor (sonde waits for its
background worker there), divided by the number of steps, so work moved off the training thread
is still paid for. Over 20 steps that is values at steps 0 and 10 and one at close: 3
eigendecompositions per layer where a long run pays 2 per 20 steps.

On a 2-core CPU the worker's eigendecomposition (~46 ms per 1024-wide layer in float32, ~63 ms
in float64, one core) does not run beside training for free: torch's two threads then share the
cores with it, and a training step slows by more than the worker's own CPU time.

Part 2: how the cost grows with layer width, for exact and approximate (Nyström sketch of 512
directions) saturation: a Linear(w, w) → ReLU → Linear(w, w) network, batch 256.

Variants run interleaved in rounds in one process, so machine noise hits them alike; the table
prints median ratios to the unmonitored loop.

    python benchmarks/saturation.py [--steps 20] [--rounds 3] [--widths 256 512 1024 2048 4096] [--no-delve]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

import sonde
from sonde.metrics import Saturation

Monitor = Callable[[nn.Module, str], contextlib.AbstractContextManager[None]]


def mlp(width: int = 1024, depth: int = 4, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1], nn.Linear(width, classes))


def linear_layers(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


@contextlib.contextmanager
def unmonitored(model: nn.Module, tmp: str) -> Iterator[None]:
    yield


def never(step: int) -> bool:
    return False


def with_sonde(approximate: str | None = None, compute_every: int | Callable[[int], bool] = 10,
               precision: str = "float32") -> Monitor:
    @contextlib.contextmanager
    def monitor(model: nn.Module, tmp: str) -> Iterator[None]:
        metric = Saturation(compute_every=compute_every, approximate=approximate, sketch_size=512,
                            precision=precision)
        with sonde.probe(model, store=None, sinks=[], layers=linear_layers, topics=["activations"], metrics=[metric]):
            yield

    monitor.loop_only = compute_every is never  # type: ignore[attr-defined]
    return monitor


@contextlib.contextmanager
def with_delve(model: nn.Module, tmp: str) -> Iterator[None]:
    from delve import SaturationTracker

    tracker = SaturationTracker(tmp, save_to="csv", modules=model, device="cpu", stats=["lsat", "idim"])
    counter = [0]

    def every_tenth(module: nn.Module, args: object) -> None:
        if counter[0] % 10 == 0 and counter[0] > 0:
            tracker.add_saturations()
        counter[0] += 1

    handle = model.register_forward_pre_hook(every_tenth)
    try:
        yield
    finally:
        handle.remove()
        tracker.add_saturations()
        tracker.close()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor: Monitor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):  # warm-up outside the timing (allocator, first-touch pages)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with monitor(model, tmp):
            for _ in range(steps):
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            loop = time.perf_counter() - start
        # "Loop only" variants leave out closing (sonde's one final value per layer) on purpose.
        return (loop if getattr(monitor, "loop_only", False) else time.perf_counter() - start) / steps


def compare(variants: dict[str, Monitor], build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
            steps: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, monitor in variants.items():
            torch.manual_seed(0)
            times[name].append(train(build(), x, y, monitor, steps))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--no-delve", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps; "
          "ratios are wall time per step (worker included) over the unmonitored loop's")

    variants: dict[str, Monitor] = {
        "unmonitored": unmonitored,
        "sonde saturation": with_sonde(),
        # The training thread's share: the covariance updates alone (timed without the close).
        "sonde, updates only": with_sonde(compute_every=never),
        "sonde, precision=float64": with_sonde(precision="float64"),
    }
    if not args.no_delve:
        try:
            import delve  # noqa: F401
        except ImportError:
            print("[skip] delve: not installed (pip install -e .[benchmark])", file=sys.stderr)
        else:
            variants["delve SaturationTracker"] = with_delve
    torch.manual_seed(0)
    x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
    result = compare(variants, mlp, x, y, args.steps, args.rounds)
    base = result["unmonitored"]
    print("\n4x1024 MLP, batch 256, saturation of every Linear layer updated every step, computed every 10th")
    print(f"{'variant':26s} {'ms/step':>9s} {'ratio':>7s}")
    for name, value in result.items():
        print(f"{name:26s} {value * 1e3:9.1f} {value / base:6.2f}x")

    print("\nwidth scaling: Linear(w, w) -> ReLU -> Linear(w, w), batch 256, computed every 10th step")
    print(f"{'width':>6s} {'unmonitored ms':>15s} {'exact':>8s} {'sketch(512)':>12s}")
    for width in args.widths:
        x, y = torch.randn(256, width), torch.randint(0, width, (256,))
        scaling = {"unmonitored": unmonitored, "exact": with_sonde(None), "sketch": with_sonde("sketch")}
        got = compare(scaling, lambda w=width: mlp(w, depth=1, classes=w), x, y, max(10, args.steps // 2), 1)
        base = got["unmonitored"]
        print(f"{width:6d} {base * 1e3:15.1f} {got['exact'] / base:7.2f}x {got['sketch'] / base:11.2f}x")


if __name__ == "__main__":
    main()
