"""``torch.compile`` and the probe: recorded steps run eagerly, the others run the compiled code untouched.

A probe's layer hooks exist only while a recorded step (or an evaluation pass) runs. While they
exist, the compiler's stance is ``force_eager``: every ``torch.compile``'d function, the probed
model's included, runs its original Python code, so the hooks fire exactly as in an eager run.
Between recorded steps the hooks are removed and the stance is put back: the compiled code runs
with no hook in it, the guards dynamo installed for it still hold (an empty hook table is what it
was compiled with), and nothing recompiles when recorded and unrecorded steps alternate.

The hooks that stay for the probe's lifetime (the root module's, which see each forward begin
and end, and the graph's first-forward hook) return at once when dynamo traces them
(:func:`tracing`), so they add nothing to a compiled graph and ``fullgraph=True`` still holds.
They run whenever the model runs eagerly, which recorded steps do.

Both orders work: a model probed then compiled (``torch.compile(model)``, ``model.compile()``)
and a compiled model given to the probe (an ``OptimizedModule``, whose root hooks run outside
the compiled code and whose layers are named without ``_orig_mod.``).
"""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any

import torch
from torch import nn

__all__ = ["EagerStance", "called_compiled", "tracing", "unwrap"]

log = logging.getLogger("sonde")


def tracing() -> bool:
    """Whether dynamo is tracing the code that calls this (a hook inside a compiled region)."""
    return bool(torch.compiler.is_compiling())


def _optimized_module() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - a torch without dynamo has no compiled modules
        return None
    return OptimizedModule


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else ``model``."""
    optimized = _optimized_module()
    while optimized is not None and isinstance(model, optimized) and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def called_compiled(model: nn.Module, depth: int = 12) -> bool:
    """Whether the running forward of ``model`` was called through a ``torch.compile`` wrapper of it
    (``torch.compile(model)`` or ``model.compile()``): then, between recorded steps, its forwards run
    compiled and unseen. Looks at the model and at most ``depth`` calling frames."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return True
    optimized = _optimized_module()
    if optimized is None:
        return False
    frame: FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and isinstance(owner, optimized) and unwrap(owner) is model:
            return True
        frame = frame.f_back
    return False


class EagerStance:
    """Puts dynamo's stance to ``force_eager`` while a recorded step runs, and back after.

    Idempotent on both sides; the stance in force before (the user's) is the one restored. Both
    run outside dynamo (``torch.compiler.disable``): where dynamo traces the code that calls them (an
    optimizer step compiled with ``torch.compile(opt.step)`` traces the probe's step hooks), setting
    the stance inside the trace is an error that would stop the step; disabled, dynamo breaks the
    graph there and runs them as Python.
    """

    def __init__(self) -> None:
        self._prior: Any = None

    @property
    def active(self) -> bool:
        return self._prior is not None

    @torch.compiler.disable
    def enter(self) -> None:
        if self._prior is not None:
            return
        from torch._dynamo import eval_frame

        self._prior = eval_frame._set_stance(eval_frame.DynamoStance("force_eager"))

    @torch.compiler.disable
    def exit(self) -> None:
        if self._prior is None:
            return
        from torch._dynamo import eval_frame

        prior, self._prior = self._prior, None
        eval_frame._set_stance(prior)
