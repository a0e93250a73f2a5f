"""Per-step overhead of sonde's default probe against an unmonitored loop, and against peers.

Everything is measured side by side in one process, interleaved in rounds so that machine
noise hits all variants alike: each round runs every variant once. The table prints the median
per-step time and the ratio of the *mean* step time (all rounds' timed steps) to the unmonitored
loop's: a budgeted schedule pays for its recorded steps too. The ``rounds`` column is the spread of
the rounds' own ratios (each to the unmonitored loop of the same round): how far one round can be
trusted on this machine.

    python benchmarks/overhead.py [--steps 200] [--rounds 3] [--no-peers] [--models mlp cnn bert gpt2] [--fresh]
        [--variants ...] [--device cpu|cuda] [--sync-steps 30]

Variants: ``sonde`` (the default probe: every topic of every layer, all default metrics, recorded
to a SQLite store, spaced by the overhead budget of 5%; the table's last column says how often
the budget recorded each metric), ``sonde every=1`` (the same, every step), ``sonde every=10``
(one step in ten), ``sonde, torch only`` (every step, without the compiled statistics kernel, as on
a machine without a C compiler), ``reads only`` (not a monitor: the floor under ``every=1``, reading once each
tensor it reads, see :func:`reads_only`), ``wandb.watch(log="all", log_freq=1)`` in offline mode, and
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

``--device cuda`` trains on the GPU under bf16 autocast (forward and loss) and times each run between two
``torch.cuda.synchronize()`` calls outside the steps, so the time includes the GPU work the steps queued. It
then adds a column: the host synchronisations per step that the probe adds to the training loop. Before the
timed rounds, each variant trains ``--sync-steps`` more steps under ``torch.cuda.set_sync_debug_mode("warn")``,
in which c10 warns at every synchronising call (``memcpy_and_sync`` and ``stream_synchronize``: ``.item()``,
``.cpu()``, ``.tolist()``, ``nonzero``, ``Stream.synchronize()``; not ``torch.cuda.synchronize()`` or
``Event.synchronize()``); the warnings raised inside the steps on any thread but sonde's own background
threads (the autograd engine's included) are counted, and the column is the variant's count minus the
unmonitored loop's, per timed step. The lines under the table name the places in sonde's code that
synchronised, if any. ``gpt2`` is GPT-2 small built from transformers' ``GPT2Config()`` (12 layers, hidden 768,
12 heads, vocabulary 50257; nothing downloaded), batch 32 x 128 tokens, next-token loss; on a CPU, a 2-layer,
hidden-128 GPT-2 (vocabulary 1000, batch 8 x 64 tokens) instead, since GPT-2 small takes seconds a step there.
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
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TextIO

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


class _TokenLogits(_Logits):
    """A transformers language model called as ``model(ids) -> logits``, one row per token."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).flatten(0, 1)


def gpt2(small: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """GPT-2 small from transformers' ``GPT2Config()``, batch 32 x 128 tokens; ``small``: 2 layers, hidden 128."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if small:
        config, batch, seq = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=64,
                                        bos_token_id=0, eos_token_id=0, use_cache=False), 8, 64
    else:
        config, batch, seq = GPT2Config(use_cache=False), 32, 128
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return _TokenLogits(GPT2LMHeadModel(config)), ids, ids.roll(-1, dims=1).flatten()  # next token (wraps round)


MODELS = {"mlp": mlp, "cnn": cnn, "bert": bert, "gpt2": gpt2}

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
def reads_only(model: nn.Module, opt: torch.optim.Optimizer, tmp: str) -> Iterator[Callable[..., None]]:
    """The floor under ``sonde every=1``: the memory traffic of reading exactly what it reads, with
    nothing computed but a norm, from torch's fused kernels, and no Python per tensor beyond a hook.

    Each probed layer's output is read in its forward hook and its gradient in a tensor hook, as sonde
    reads them (an in-place op may overwrite either later). At the optimizer's pre-step every parameter
    is copied into a buffer (the value before the step, which an exact update needs; the copy is also
    the read of the weights) and every gradient is read; after the step every parameter and its buffer
    are read (the update after - before, which sonde's kernel reads in one pass without writing it).
    """
    from sonde.probe.torch import select_layers

    params = [p for p in model.parameters() if p.requires_grad]
    before = [torch.empty_like(p) for p in params]

    def read(tensor: torch.Tensor) -> None:
        torch.linalg.vector_norm(tensor.detach())

    def forward(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            read(output)
            if output.requires_grad:
                output.register_hook(read)

    def pre_step(*args: object) -> None:
        with torch.no_grad():
            torch._foreach_copy_(before, params)
            torch._foreach_norm([p.grad for p in params if p.grad is not None])

    def post_step(*args: object) -> None:
        with torch.no_grad():
            torch._foreach_norm(params)
            torch._foreach_norm(before)

    handles = [m.register_forward_hook(forward) for m in select_layers(model).values()]
    handles += [opt.register_step_pre_hook(pre_step), opt.register_step_post_hook(post_step)]
    yield lambda **kw: None
    for handle in handles:
        handle.remove()


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


#: The text of c10's warning in ``torch.cuda.set_sync_debug_mode("warn")`` (``warn_or_error_on_sync``).
SYNC_WARNING = "called a synchronizing CUDA operation"
SONDE_DIR = os.path.dirname(os.path.abspath(sonde.__file__))


class SyncCensus:
    """Every synchronising CUDA call warned about while counting: (step, thread name, place).

    The place is the innermost frame in sonde's package on the calling thread's stack ("sonde/...:line"), or,
    where sonde is not on the stack, the line the warning names (the Python line that called into torch)."""

    def __init__(self) -> None:
        self.step = 0
        self.calls: list[tuple[int, str, str]] = []

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=SYNC_WARNING)
            shown = warnings.showwarning

            def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None) -> None:
                if SYNC_WARNING not in str(message):
                    shown(message, category, filename, lineno, file, line)
                    return
                place = f"{os.path.relpath(filename)}:{lineno}"
                for frame in reversed(traceback.extract_stack()[:-1]):  # callers of show()
                    if frame.filename.startswith(SONDE_DIR + os.sep):
                        place = f"sonde/{os.path.relpath(frame.filename, SONDE_DIR)}:{frame.lineno}"
                        break
                self.calls.append((self.step, threading.current_thread().name, place))

            warnings.showwarning = show
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)

    def training_path(self, timed: bool = True) -> list[str]:
        """The places of the calls made off sonde's background threads ("sonde-..."), in the timed steps or the
        warm-up ones: the training thread's and the autograd engine's (which runs the backward hooks on CUDA)."""
        return [place for step, thread, place in self.calls
                if (step >= 3) == timed and not thread.startswith("sonde-")]


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor: Monitor, steps: int, tmp: str,
    census: SyncCensus | None = None,
) -> tuple[float, float]:
    """(seconds per step, minor page faults per step) over ``steps`` timed steps; on CUDA under bf16 autocast,
    with the synchronising calls of all steps counted into ``census`` where one is given."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    cuda = x.is_cuda
    with monitor(model, opt, tmp) as log, census.counting() if census else contextlib.nullcontext():
        for i in range(steps + 3):
            if i == 3:  # warm-up steps (allocator, first-step histogram edges) are not timed
                if cuda:
                    torch.cuda.synchronize()
                start, faulted = time.perf_counter(), faults()
            if census:
                census.step = i
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                out = model(x)
                loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            log(loss=loss, labels=y, outputs=out)
            opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        elapsed, faulted = time.perf_counter() - start, faults() - faulted
    return elapsed / steps, faulted / steps


def measure(model_name: str, monitor: Monitor, steps: int, device: str = "cpu",
            census: SyncCensus | None = None) -> tuple[float, float]:
    torch.manual_seed(0)
    model, x, y = gpt2(small=device == "cpu") if model_name == "gpt2" else MODELS[model_name]()
    with tempfile.TemporaryDirectory() as tmp:
        return train(model.to(device), x.to(device), y.to(device), monitor, steps, tmp, census)


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
                        help="bert: a 4-layer BERT from transformers (57 probed layers, ~380 tensors per step); "
                        "gpt2: GPT-2 small from transformers' GPT2Config(), batch 32 x 128 tokens (on a CPU: 2 "
                        "layers, hidden 128, batch 8 x 64)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 autocast, synchronised timing, and host synchronisations per step")
    parser.add_argument("--sync-steps", type=int, default=30,
                        help="on cuda, the timed steps of each variant's run counting host synchronisations")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants: dict[str, Monitor] = {
        "unmonitored": unmonitored, "sonde": with_sonde, "sonde every=1": with_sonde_every_1,
        "sonde every=10": with_sonde_every_10, "sonde, torch only": with_sonde_torch_reductions,
        "reads only": reads_only,
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
        print(*measure(args.child[0], variants[args.child[1]], args.steps, args.device))
        return
    cuda = args.device == "cuda"
    count = cuda and args.sync_steps > 0
    where = "each run in a fresh process" if args.fresh else "one process"
    on = f"{torch.cuda.get_device_name()}, bf16 autocast, " if cuda else ""
    print(f"{where}: {on}torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'model':8s} {'variant':18s} {'ms/step':>9s} {'mean ratio':>10s} {'rounds':>11s} {'faults/step':>12s}"
          + (f" {'host syncs/step':>15s}" if count else ""))
    for model_name in args.models:
        times: dict[str, list[float]] = {name: [] for name in variants}
        faulted: dict[str, list[float]] = {name: [] for name in variants}
        censuses: dict[str, SyncCensus] = {}
        if count:  # before the timed rounds, so that these runs also warm up CUDA's libraries
            for name, monitor in variants.items():
                censuses[name] = SyncCensus()
                measure(model_name, monitor, args.sync_steps, args.device, censuses[name])
        for _ in range(args.rounds):
            for name, monitor in variants.items():
                if args.fresh:
                    command = [sys.executable, __file__, "--child", model_name, name, "--steps", str(args.steps),
                               "--device", args.device, *(["--threads", str(args.threads)] if args.threads else [])]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
                    seconds, pages = float(output[-2]), float(output[-1])
                else:
                    seconds, pages = measure(model_name, monitor, args.steps, args.device)
                times[name].append(seconds)
                faulted[name].append(pages)
                print(f"  {model_name} round {len(times[name])}: {name} {seconds * 1e3:.2f} ms/step", file=sys.stderr,
                      flush=True)
        for name, values in times.items():
            ratio = sum(values) / sum(times["unmonitored"])  # every round runs the same number of steps
            # the spread: each round's ratio to the unmonitored loop of the same round
            per_round = [v / u for v, u in zip(values, times["unmonitored"], strict=True)]
            spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
            syncs = ""
            if count:
                added = len(censuses[name].training_path()) - len(censuses["unmonitored"].training_path())
                syncs = f" {added / args.sync_steps:15.2f}"
            print(f"{model_name:8s} {name:18s} {statistics.median(values) * 1e3:9.2f} {ratio:9.3f}x {spread:>11s} "
                  f"{statistics.median(faulted[name]):12.0f}{syncs}")
        for name, census in censuses.items():
            timed, warm = census.training_path(), census.training_path(timed=False)
            background = len(census.calls) - len(timed) - len(warm)
            places = Counter(place for _, _, place in census.calls if place.startswith("sonde/"))
            print(f"{model_name:8s} {name}: host synchronisations in {args.sync_steps} timed steps {len(timed)}, "
                  f"in the 3 warm-up steps {len(warm)}, on sonde's threads {background}; in sonde's code: "
                  + (", ".join(f"{place} x{n}" for place, n in places.most_common()) or "none"))
        if "sonde" in variants and RECORDED and not args.fresh:
            counts = ", ".join(f"{metric} {n}" for metric, n in sorted(RECORDED.items()))
            print(f"{model_name:8s} sonde (budget), steps with a value per metric, last round of "
                  f"{args.steps + 3} steps: {counts}; intervals chosen {CHOSEN.get('schedule')}, measured cost "
                  f"{CHOSEN.get('cost') or 0:.1%} of a step")


if __name__ == "__main__":
    main()
