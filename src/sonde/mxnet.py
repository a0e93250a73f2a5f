"""MXNet integration: ``with sonde.mxnet.probe(net, trainer=trainer) as p:`` for Gluon blocks.

The implementation lives in :mod:`sonde.probe.mxnet` (one module per framework adapter). MXNet
1.9 needs ``numpy<1.24``, so it is tested in its own environment (``make test-mxnet``).
"""

from __future__ import annotations

from sonde.probe.mxnet import probe

__all__ = ["probe"]
