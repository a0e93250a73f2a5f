"""Parametrized modules (``torch.nn.utils.parametrize``) as the torch probe sees them.

A parametrized module computes a tensor (``weight``) from parameters held in modules that
``parametrize`` adds below it (``parametrizations.weight.original0``, …). Those modules are part of
the layer, not layers of their own; the layer's ``weights`` topic is the computed tensor, taken
from the forward (a forward hook on the ``ParametrizationList`` that computes it), and its
gradients and updates are those of the parameters the optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["computed_from", "internals", "is_leaf", "owns_params", "parametrized_tensors"]


def internals(model: nn.Module) -> set[int]:
    """The ids of the modules ``parametrize`` added below the parametrized modules of ``model``."""
    return {id(m) for owner in model.modules() if parametrize.is_parametrized(owner)
            for m in owner.parametrizations.modules()}  # type: ignore[union-attr]


def computed_from(model: nn.Module) -> set[int]:
    """The ids of the parameters parametrizations compute tensors from (weight_norm's ``original0``/``1``)."""
    return {id(p) for m in model.modules() if parametrize.is_parametrized(m)
            for p in m.parametrizations.parameters()}  # type: ignore[union-attr]


def is_leaf(module: nn.Module) -> bool:
    """No children, the ``parametrizations`` container of a parametrized module not counted."""
    parametrized = parametrize.is_parametrized(module)
    return next((c for n, c in module.named_children() if not (parametrized and n == "parametrizations")),
                None) is None


def owns_params(module: nn.Module) -> bool:
    """Parameters of its own (a parametrized module's are held by its parametrizations)."""
    return parametrize.is_parametrized(module) or next(module.parameters(recurse=False), None) is not None


def parametrized_tensors(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[tuple[str, str, nn.Module]]:
    """``(layer, tensor name, the module computing it)`` for each parametrized tensor, the layer
    being the deepest probed one at or above its module (``("0", "weight", m[0].parametrizations.weight)``;
    a tensor of a module below the layer is named by its path from the layer)."""
    by_depth = sorted(((name, id(m)) for name, m in layers.items()), key=lambda item: -len(item[0]))
    paths = {id(m): name for name, m in model.named_modules()}
    for owner_name, owner in model.named_modules():
        if not parametrize.is_parametrized(owner):
            continue
        for layer, layer_id in by_depth:
            layer_path = paths.get(layer_id, "")
            if layer_path == owner_name or not layer_path or owner_name.startswith(layer_path + "."):
                prefix = owner_name[len(layer_path):].lstrip(".")
                for tensor_name, computed in owner.parametrizations.items():  # type: ignore[union-attr]
                    yield layer, f"{prefix}.{tensor_name}" if prefix else tensor_name, computed
                break
