"""MXNet integration: ``with sonde.mxnet.probe(net, trainer=trainer) as p:`` for Gluon blocks,
``with sonde.mxnet.probe_module(module) as p:`` for Symbol models trained with ``mx.mod.Module``.

The implementations live in :mod:`sonde.probe.mxnet` and :mod:`sonde.probe.mxnet_module` (one
module per framework adapter). MXNet 1.9 needs ``numpy<1.24``, so it is tested in its own
environment (``make test-mxnet``).
"""

from __future__ import annotations

from sonde.probe.mxnet import probe
from sonde.probe.mxnet_module import probe_module

__all__ = ["probe", "probe_module"]
