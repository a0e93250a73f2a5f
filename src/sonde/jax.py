"""JAX integration: ``with sonde.jax.probe(model, optimizer=optimizer) as p:`` for Flax NNX models.

The implementation lives in :mod:`sonde.probe.jax` (one module per framework adapter).
"""

from __future__ import annotations

from sonde.probe.jax import probe

__all__ = ["probe"]
