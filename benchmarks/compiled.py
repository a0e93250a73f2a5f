"""``torch.compile``'d training under the probe: step times against the compiled unprobed loop,
and the graphs dynamo compiled.

    python benchmarks/compiled.py [--steps 40] [--rounds 3] [--models mlp bert] [--threads 1]

For each model, in one process: eager unprobed (for reference), compiled unprobed, compiled probed
with ``every=10`` and compiled probed every step, one after the other, in rounds (each round runs
every variant once, afresh) so that machine noise hits all variants alike. The model is compiled
with the default inductor backend (``torch.compile(model)``) and then given to ``sonde.probe``
(with its optimizer, a SQLite store and the default metrics). Before each variant dynamo's caches
and counters are reset, so that its graph count (``counters["stats"]["unique_graphs"]``) is its
own; inductor's on-disk cache of compiled code is not (later variants may compile faster, which
the untimed warm-up hides). The first 3 steps are not timed: they compile (the probed loops'
step 0 is recorded and runs eagerly, step 1 compiles).

The table prints each variant's mean step time over all rounds and its ratio to the compiled
unprobed loop's, and for the probed loops the mean time of the recorded steps (run eagerly, with the layer hooks), of
the steps right after one (where the probe flushes the recorded step's metrics), and of the other
unrecorded steps (the compiled code, with nothing of the probe in it).

Torch runs one thread by default here: on a machine whose cores other jobs share, two OpenMP
threads spinning on oversubscribed cores made single steps vary tenfold (0.1 s to 1.7 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from overhead import _Logits, mlp
from torch import nn
from torch._dynamo.utils import counters

import sonde

WARMUP = 3


def bert() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A BERT from its config, hidden 128, 2 layers: batch 16 × 64 tokens."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        vocab_size=1000, max_position_embeddings=128)
    return _Logits(BertForSequenceClassification(config)), torch.randint(0, 1000, (16, 64)), torch.randint(0, 2, (16,))


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {"mlp": mlp, "bert": bert}
VARIANTS: dict[str, tuple[bool, int | None]] = {  # name: (compiled, every; None: unprobed)
    "eager, unprobed": (False, None),
    "compiled, unprobed": (True, None),
    "compiled, every=10": (True, 10),
    "compiled, every=1": (True, 1),
}


def run(model_name: str, compiled: bool, every: int | None, steps: int) -> tuple[list[float], int]:
    """Each timed step's seconds, and the graphs dynamo compiled."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, x, y = MODELS[model_name]()
    call = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = (sonde.probe(call, optimizer=opt, store=os.path.join(tmp, "bench.db"), every=every)
                 if every is not None else None)
        try:
            for step in range(WARMUP + steps):
                start = time.perf_counter()
                loss = loss_fn(call(x), y)
                loss.backward()
                opt.step()
                if probe is not None:
                    probe.log(loss=loss)
                opt.zero_grad()
                if step >= WARMUP:
                    times.append(time.perf_counter() - start)
        finally:
            if probe is not None:
                probe.close()
    return times, int(counters["stats"]["unique_graphs"])


def mean_ms(values: list[float]) -> str:
    return f"{statistics.fmean(values) * 1e3:.1f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["mlp", "bert"])
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, inductor, "
          f"{args.rounds} rounds x ({WARMUP} warm-up + {args.steps} timed steps) per variant")
    print(f"{'model':6s} {'variant':20s} {'ms/step':>8s} {'ratio':>7s} {'graphs':>6s} "
          f"{'recorded':>9s} {'after':>7s} {'others':>7s}")
    for model_name in args.models:
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        graphs: dict[str, set[int]] = {name: set() for name in VARIANTS}
        for round_ in range(args.rounds):
            for name, (compiled, every) in VARIANTS.items():
                timed, compiled_graphs = run(model_name, compiled, every, args.steps)
                times[name] += timed
                graphs[name].add(compiled_graphs)
                print(f"  {model_name} round {round_ + 1}: {name} {statistics.fmean(timed) * 1e3:.1f} ms/step",
                      file=sys.stderr, flush=True)
        base = statistics.fmean(times["compiled, unprobed"])
        for name, (_, every) in VARIANTS.items():
            mean = statistics.fmean(times[name])
            ratio = f"{mean / base:6.2f}x"
            counted = "/".join(str(n) for n in sorted(graphs[name]))
            split = ""
            if every is not None:  # timed step i of a round is step WARMUP + i; k is recorded when k % every == 0
                steps = [WARMUP + i % args.steps for i in range(len(times[name]))]
                timed = times[name]
                recorded = [t for k, t in zip(steps, timed, strict=True) if k % every == 0]
                after = [t for k, t in zip(steps, timed, strict=True) if k % every == 1 and every > 1]
                others = [t for k, t in zip(steps, timed, strict=True) if k % every > 1]
                split = f" {mean_ms(recorded):>9s} {mean_ms(after):>7s} {mean_ms(others):>7s}"
            print(f"{model_name:6s} {name:20s} {mean * 1e3:8.1f} {ratio} {counted:>6s}{split}", flush=True)


if __name__ == "__main__":
    main()
