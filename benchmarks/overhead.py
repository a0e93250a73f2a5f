"""Per-step overhead of sonde's default probe against an unmonitored loop, and against peers.

Everything is measured side by side in one process, interleaved in rounds so that machine
noise hits all variants alike: each round runs every variant once. The table prints the median
per-step time and the ratio of the *mean* step time (all rounds' timed steps) to the unmonitored
loop's: a budgeted schedule pays for its recorded steps too.

    python benchmarks/overhead.py [--steps 200] [--rounds 3] [--no-peers] [--models mlp cnn bert] [--fresh]
        [--variants ...]

Variants: ``sonde`` (the default probe: every topic of every layer, all default metrics, recorded
to a SQLite store, spaced by the overhead budget of 5%; the table's last column says how often
the budget recorded each metric), ``sonde every=1`` (the same, every step), ``sonde every=10``
(one step in ten), ``sonde, torch only`` (every step, without the compiled statistics kernel, as on
a machine without a C compiler), ``wandb.watch(log="all", log_freq=1)`` in offline mode, and
TensorBoard ``add_histogram`` of every parameter and gradient every step. The peers are skipped,
with a note, when their packages are missing (``pip install -e .[benchmark]``); ``--variants``
picks some. The first 3 steps of every variant are not timed (allocator warm-up).

The table also prints each variant's minor page faults per timed step (the whole process). In a
fresh process glibc's malloc gives the top of the heap back to the OS after each step's peak and
faults it in again at the next: thousands of faults per step, and a hook that allocates or frees
at other moments moves that churn up or down by more than its own cost. In this one process the
first round's large blocks raise glibc's dynamic thresholds, so the timed steps are nearly
fault-free and the ratios compare the probes' own work. ``--fresh`` runs every (round, variant) in
a new Python process instead, as a user's training script starts: slower, noisier, and what a
user sees first (both are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

import sonde


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    model = nn.Sequential(*layers[:-1], nn.Linear(1024, 10))
    return model, torch.randn(256, 1024), torch.randint(0, 10, (256,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


class _Logits(nn.Module):
    """A transformers classifier called as ``model(ids) -> logits``, like the other models here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def bert() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small BERT (4 layers, hidden 128) built from its config: many small layers, batch 32 × 64 tokens."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                        vocab_size=1000, max_position_embeddings=128)
    return _Logits(BertForSequenceClassification(config)), torch.randint(0, 1000, (32, 64)), torch.randint(0, 2, (32,))


MODELS = {"mlp": mlp, "cnn": cnn, "bert": bert}

Monitor = Callable[[nn.Module, torch.optim.Optimizer, str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def unmonitored(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    yield lambda **kw: None


#: How often the budgeted probe of the last run recorded each metric: {metric: steps with a value}.
RECORDED: dict[str, int] = {}
#: What the budget of the last run chose (``p.schedule()``) and the cost it measured, as a fraction of a step.
CHOSEN: dict[str, object] = {}


@contextlib.contextmanager
def with_sonde(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    """The default probe: no ``every=``, so the overhead budget (5%) spaces the recordings."""
    db = os.path.join(tmp, "bench.db")
    with sonde.probe(model, optimizer=opt, store=db, every=None) as p:  # every=None: the default
        yield p.log
        CHOSEN.update(schedule=p.schedule(), cost=p.budget.estimate if p.budget is not None else None)
    frame = sonde.load(db)
    RECORDED.clear()
    RECORDED.update(frame[frame.layer != ""].groupby("metric")["step"].nunique().to_dict())


@contextlib.contextmanager
def with_sonde_every_1(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    with sonde.probe(model, optimizer=opt, store=os.path.join(tmp, "bench.db"), every=1) as p:
        yield p.log


@contextlib.contextmanager
def with_sonde_every_10(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    with sonde.probe(model, optimizer=opt, store=os.path.join(tmp, "bench.db"), every=10) as p:
        yield p.log


@contextlib.contextmanager
def with_sonde_torch_reductions(
    model: nn.Module, opt: torch.optim.Optimizer, tmp: str
) -> Iterator[Callable[..., None]]:
    """The default probe without the compiled kernel: what a machine without a C compiler pays."""
    from sonde.functional import native

    with native.disabled(), with_sonde_every_1(model, opt, tmp) as log:
        yield log


@contextlib.contextmanager
def with_wandb(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    import wandb

    run = wandb.init(mode="offline", dir=tmp, project="sonde-bench", reinit=True)
    wandb.watch(model, log="all", log_freq=1)
    yield lambda **kw: wandb.log({"loss": kw["loss"].item()})
    wandb.unwatch(model)
    run.finish()


@contextlib.contextmanager
def with_tensorboard(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(tmp, "tb"))
    step = [0]

    def log(**kw: torch.Tensor) -> None:
        # Gradients are read after opt.step() here, before zero_grad (see train()).
        for name, param in model.named_parameters():
            writer.add_histogram(name, param, step[0])
            if param.grad is not None:
                writer.add_histogram(name + ".grad", param.grad, step[0])
        writer.add_scalar("loss", kw["loss"].item(), step[0])
        step[0] += 1

    yield log
    writer.close()


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor: Monitor, steps: int, tmp: str
) -> tuple[float, float]:
    """(seconds per step, minor page faults per step) over ``steps`` timed steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with monitor(model, opt, tmp) as log:
        for i in range(steps + 3):
            if i == 3:  # warm-up steps (allocator, first-step histogram edges) are not timed
                start, faulted = time.perf_counter(), faults()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            log(loss=loss, labels=y, outputs=out)
            opt.zero_grad()
        elapsed, faulted = time.perf_counter() - start, faults() - faulted
    return elapsed / steps, faulted / steps


def measure(model_name: str, monitor: Monitor, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model, x, y = MODELS[model_name]()
    with tempfile.TemporaryDirectory() as tmp:
        return train(model, x, y, monitor, steps, tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own; 1 is steadier "
                        "on a machine other jobs load)")
    parser.add_argument("--variants", nargs="*", help="the variants to run (default: all), beside unmonitored")
    parser.add_argument("--fresh", action="store_true", help="each variant of each round in a new process")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["mlp", "cnn"],
                        help="bert: a 4-layer BERT from transformers (57 probed layers, ~380 tensors per step)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants: dict[str, Monitor] = {
        "unmonitored": unmonitored, "sonde": with_sonde, "sonde every=1": with_sonde_every_1,
        "sonde every=10": with_sonde_every_10, "sonde, torch only": with_sonde_torch_reductions,
    }
    if not args.no_peers:
        peers = (("wandb.watch", "wandb", with_wandb), ("tensorboard", "tensorboard", with_tensorboard))
        for name, module, monitor in peers:
            try:
                __import__(module)
                variants[name] = monitor
            except ImportError:
                print(f"[skip] {name}: `{module}` not installed (pip install -e .[benchmark])", file=sys.stderr)
    if args.variants:
        variants = {name: monitor for name, monitor in variants.items()
                    if name == "unmonitored" or name in args.variants}
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.child:
        print(*measure(args.child[0], variants[args.child[1]], args.steps))
        return
    where = "each run in a fresh process" if args.fresh else "one process"
    print(f"{where}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'model':8s} {'variant':18s} {'ms/step':>9s} {'mean ratio':>10s} {'faults/step':>12s}")
    for model_name in args.models:
        times: dict[str, list[float]] = {name: [] for name in variants}
        faulted: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, monitor in variants.items():
                if args.fresh:
                    command = [sys.executable, __file__, "--child", model_name, name, "--steps", str(args.steps),
                               *(["--threads", str(args.threads)] if args.threads else [])]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
                    seconds, pages = float(output[-2]), float(output[-1])
                else:
                    seconds, pages = measure(model_name, monitor, args.steps)
                times[name].append(seconds)
                faulted[name].append(pages)
                print(f"  {model_name} round {len(times[name])}: {name} {seconds * 1e3:.2f} ms/step", file=sys.stderr,
                      flush=True)
        for name, values in times.items():
            ratio = sum(values) / sum(times["unmonitored"])  # every round runs the same number of steps
            print(f"{model_name:8s} {name:18s} {statistics.median(values) * 1e3:9.2f} {ratio:9.3f}x "
                  f"{statistics.median(faulted[name]):12.0f}")
        if "sonde" in variants and RECORDED and not args.fresh:
            counts = ", ".join(f"{metric} {n}" for metric, n in sorted(RECORDED.items()))
            print(f"{model_name:8s} sonde (budget), steps with a value per metric, last round of "
                  f"{args.steps + 3} steps: {counts}; intervals chosen {CHOSEN.get('schedule')}, measured cost "
                  f"{CHOSEN.get('cost') or 0:.1%} of a step")


if __name__ == "__main__":
    main()
