"""``sonde.probe``: attach probes to a model. One module per framework adapter."""

from __future__ import annotations

from typing import Any

from sonde.probe.core import Probe, not_a_module

__all__ = ["Probe", "probe"]


def probe(model: Any, **kwargs: Any) -> Probe:
    """Attach probes to ``model`` for one run; use as a context manager.

    Args:
        model: a ``torch.nn.Module`` (other frameworks have their own adapters).
        **kwargs: the keywords below.

    Keyword Args:
        run: run name; default: the model class name made unique in the store.
        store: path of the SQLite store (default ``sonde.db``), a SQLAlchemy URL, or None.
        server: URL of a running ``sonde serve`` (or a ``sonde.sinks.RemoteSink``): Records go there
            instead of the local store, spilling to disk while the server is unreachable.
        optimizer: the optimizer; its steps are sonde's steps and give ``*_updates``.
        layers: a callable ``(name, module) -> bool`` or a list of names/globs.
        topics: topics to capture (default: all); see ``sonde.topics.TOPICS``.
        metrics: metric names and/or configured ``sonde.metrics`` instances (default: all built-ins).
        every: record step k when ``k % every == 0``, or any schedule ``step -> bool``; ``every=1``
            records every step. Default None: the overhead budget chooses (:mod:`sonde.budget`).
        budget: when ``every`` is None, the fraction of training time monitoring may take (default
            0.05): sonde measures its own cost and records each metric as often as that allows
            (offloaded metrics such as saturation less often), every step of the first 8 steps and of
            the 5 steps after the loss turns NaN/Inf or spikes; ``p.schedule()`` says what it chose.
        max_interval: when ``every`` is None, no metric goes longer than this many steps without a
            value (default 100).
        depth: None for leaf modules (and modules owning parameters), k for modules k levels down.
        sinks: extra sinks by name (``"tensorboard"``, ``"csv"``, ``"console"``) or instance.
        resume: append to an existing run of the same name instead of refusing.
        per_rank: under torch.distributed, also record each rank's own ``activations`` statistics
            (before the merge) as layers ``<layer>@rank<r>``, beside the merged ones (default False).
        probe_set: inputs, or ``(inputs, labels)``, evaluated aside (no grad, eval mode, modes and
            RNG restored, not seen by the other metrics) at the steps the probe-set metrics
            (``cka``, ``svcca``, ``cka_matrix``, ``probe_f1``, ``cluster_mi``) compute.

    Example:
        >>> import torch, sonde
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> with sonde.probe(model, store=None) as p:
        ...     _ = model(torch.randn(8, 4)).sum().backward()
    """
    try:
        import torch.nn
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(model, torch.nn.Module):
        from sonde.probe.torch import TorchProbe

        return TorchProbe(model, **kwargs)
    raise not_a_module(model)
