"""Topology of a network: :func:`graph` traces one forward pass into a :class:`Graph`.

Example:
    >>> import torch, sonde
    >>> g = sonde.graph(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh()), torch.zeros(1, 4))
    >>> g.edges
    [('input', '0'), ('0', '1'), ('1', 'output')]
"""

from __future__ import annotations

from sonde.graph.extract import graph
from sonde.graph.model import Graph, GraphError, Node

__all__ = ["Graph", "GraphError", "Node", "graph"]
