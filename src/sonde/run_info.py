"""What is known about a run when it opens: its name, model, config and probed layers.

The probe builds a :class:`RunInfo`, every sink receives it in ``Sink.open``, the store keeps it
(``Store.start_run``) and the server builds one from ``POST /api/v1/runs``; so it lives here, in
the core, which imports no other part of sonde.

Example:
    >>> info = RunInfo("mlp", model="MLP", layers=[LayerInfo("fc1", "Linear", {"weight": [4, 8]})])
    >>> info.layers[0].param_shapes["weight"], info.first_step
    ([4, 8], 0)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerInfo", "RunInfo"]


@dataclass
class LayerInfo:
    """A probed layer as the store keeps it.

    Example:
        >>> LayerInfo("fc1", "Linear", {"weight": [4, 8], "bias": [4]}).type
        'Linear'
    """

    name: str
    type: str
    param_shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RunInfo:
    """What sinks learn about a run when it opens.

    ``first_step`` is set by the store sink when it resumes a run (the step after the last stored).

    Example:
        >>> RunInfo("mlp", framework="torch", config={"lr": 0.1}).resume
        False
    """

    name: str
    model: str = ""
    framework: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerInfo] = field(default_factory=list)
    resume: bool = False
    first_step: int = 0


def user_class(cls: type) -> type:
    """The class the user wrote for a module. FSDP2's ``fully_shard`` swaps a module's class for a
    subclass of it (``FSDPLinear`` for ``Linear``): that gives the original; any other class is its own."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    original: type = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 2)]
    return original
