"""``sonde graph MODULE:FACTORY --input-shape 1,3,224,224``: print (and save) a model's graph.

``MODULE`` is an importable module (``mypkg.models``) or a ``.py`` file; ``FACTORY`` a callable in
it returning a ``torch.nn.Module`` (called without arguments), or a module instance.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sonde.graph.extract import graph
from sonde.graph.model import GraphError
from sonde.graph.render import format_tree, readable_view, to_svg

__all__ = ["add_parser", "load_model", "run"]

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.long, "long": torch.long, "int32": torch.int32,
           "bool": torch.bool}


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``graph`` subcommand to ``commands`` (an argparse subparsers object)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "graph", help="trace a model's forward pass and print its graph (module tree, shapes, parameters)")
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="module path or .py file, and a callable in it returning the model (mypkg.nets:resnet18)")
    parser.add_argument("--input-shape", action="append", required=True, metavar="D0,D1,...",
                        help="shape of an example input; repeat for several positional inputs (1,3,224,224)")
    parser.add_argument("--dtype", action="append", default=None, choices=sorted(_DTYPES),
                        help="dtype of each input (default float32; int64 for token ids)")
    parser.add_argument("--depth", type=int, default=None, help="show modules down to this depth (1: top level)")
    parser.add_argument("--fold", action="store_true", help="fold runs of identical blocks into one (× n)")
    parser.add_argument("--prune", action="store_true", help="leave out views, reshapes, identities, inactive dropout")
    parser.add_argument("--device", default="auto", choices=["auto", "meta", "fake", "real"],
                        help="trace on meta or fake tensors (no memory, no compute), real tensors, or the first "
                             "of these that works (auto, the default)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full graph as JSON to PATH")
    parser.add_argument("--svg", default=None, metavar="PATH", help="write a picture of the graph to PATH")
    return parser


def load_model(target: str) -> nn.Module:
    """The module ``MODULE:FACTORY`` names (``FACTORY`` called with no arguments when it is not a module)."""
    if ":" not in target:
        raise GraphError(f"expected MODULE:FACTORY (e.g. mypkg.models:resnet18 or nets.py:build), got {target!r}")
    where, _, attr = target.rpartition(":")
    if where.endswith(".py") or Path(where).is_file():
        path = Path(where)
        if not path.is_file():
            raise GraphError(f"no such file {where!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise GraphError(f"cannot import {where!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise GraphError(f"cannot import module {where!r}: {exc}") from exc
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")][:10]
        raise GraphError(f"{where!r} has no attribute {attr!r}; it has {names}")
    factory = getattr(module, attr)
    try:
        model = factory if isinstance(factory, nn.Module) else factory()
    except Exception as exc:  # any failure of user code is reported the same way
        raise GraphError(f"calling {target}() to build the model failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise GraphError(f"{target} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _inputs(shapes: list[str], dtypes: list[str] | None) -> tuple[torch.Tensor, ...]:
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise GraphError(f"give one --dtype, or one per --input-shape ({len(shapes)}); got {len(dtypes)}")
    tensors = []
    for i, text in enumerate(shapes):
        try:
            shape = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise GraphError(f"--input-shape expects integers separated by commas (1,3,224,224), got {text!r}"
                             ) from None
        dtype = _DTYPES[(dtypes[i] if len(dtypes) > 1 else dtypes[0]) if dtypes else "float32"]
        tensors.append(torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def run(args: argparse.Namespace) -> int:
    """Execute ``sonde graph`` with parsed arguments; returns the exit status."""
    try:
        model = load_model(args.target)
        g = graph(model, _inputs(args.input_shape, args.dtype), device=args.device)
    except GraphError as exc:
        print(f"sonde graph: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(g.to_json())
    if args.svg:
        Path(args.svg).write_text(to_svg(readable_view(g)))
    view = g.prune() if args.prune else g
    view = view.fold() if args.fold else view
    view = view.collapse(args.depth) if args.depth else view
    print(format_tree(view))
    for path in (args.json, args.svg):
        if path:
            print(f"wrote {path}")
    return 0
