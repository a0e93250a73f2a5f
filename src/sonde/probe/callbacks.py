"""What the trainer callbacks share (:mod:`sonde.transformers`, :mod:`sonde.lightning`).

A callback holds :func:`sonde.probe`'s keywords until training starts, then attaches a
:class:`~sonde.probe.torch.TorchProbe` to the trainer's model with the trainer's optimizer; it
logs each batch's loss (and labels and predictions where the trainer exposes them), marks epoch
ends, and closes the probe when training ends. Bad keywords fail when the callback is made, not at
the first step; a failure while logging is reported once and never reaches training.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from sonde.errors import ConfigError
from sonde.probe.core import guarded
from sonde.probe.kit import check_keywords
from sonde.probe.torch import TorchProbe

__all__ = ["CallbackProbe"]

log = logging.getLogger("sonde")

#: What a callback cannot take: the trainer supplies the model and the optimizer.
_FROM_TRAINER = ("model", "optimizer")


class CallbackProbe:
    """The probe of one ``fit``/``train`` call, made from keywords kept since the callback was made.

    Args:
        **probe_kwargs: :func:`sonde.probe`'s keywords (``run``, ``store``, ``server``, ``layers``,
            ``topics``, ``metrics``, ``every``, ``depth``, ``sinks``, ``resume``, ``probe_set``).

    Example:
        >>> from sonde.probe.callbacks import CallbackProbe
        >>> try:
        ...     CallbackProbe(optimizer=None)
        ... except Exception as exc:
        ...     print(exc)
        CallbackProbe takes the model and the optimizer from the trainer; do not pass optimizer=
    """

    def __init__(self, **probe_kwargs: Any) -> None:
        name = type(self).__name__
        given = sorted(set(probe_kwargs) & set(_FROM_TRAINER))
        if given:
            raise ConfigError(f"{name} takes the model and the optimizer from the trainer; do not pass "
                              + ", ".join(f"{k}=" for k in given))
        accepted = set(inspect.signature(TorchProbe.__init__).parameters) - {"self", *_FROM_TRAINER}
        check_keywords(name, probe_kwargs, accepted, " (sonde.probe's)")
        self.probe_kwargs = probe_kwargs
        self.probe: TorchProbe | None = None
        self._warned: set[str] = set()
        self._hook: Any = None  # attach's forward hook

    def attach(self, model: nn.Module, optimizers: Sequence[Any], on_forward: Callable[..., None],
               with_kwargs: bool = False) -> TorchProbe:
        """Probe ``model`` with the first of ``optimizers`` (a second ``fit`` is a second run), and
        call ``on_forward`` after each of the model's forward passes (a forward hook, removed at
        :meth:`close`), where the callback finds what to log."""
        self.close("finished")
        optimizers = [o for o in optimizers if o is not None]
        if len(optimizers) > 1:
            log.warning("sonde: the trainer has %d optimizers; steps and updates follow the first (%s)",
                        len(optimizers), type(optimizers[0]).__name__)
        self.probe = TorchProbe(model, optimizer=optimizers[0] if optimizers else None, **self.probe_kwargs)
        self._hook = model.register_forward_hook(on_forward, with_kwargs=with_kwargs)
        return self.probe

    def log(self, **values: Any) -> None:
        """``Probe.log`` of the values that are not None; a failure is reported once."""
        values = {k: v for k, v in values.items() if v is not None}
        if values and self.attached:
            self._guard("logging the batch's loss and labels", lambda: self.probe.log(**values))  # type: ignore[union-attr]

    def begin_batch(self) -> None:
        if self.attached:
            self._guard("step bookkeeping", lambda: self.probe.begin_batch())  # type: ignore[union-attr]

    def end_epoch(self) -> None:
        if self.attached:
            self._guard("marking the end of an epoch", lambda: self.probe.end_epoch())  # type: ignore[union-attr]

    def close(self, status: str) -> None:
        """Close the probe (idempotent): the forward hook goes, the last step is recorded and the
        sinks close."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        probe, self.probe = self.probe, None
        if probe is not None:
            self._guard("closing the probe", lambda: probe.close(status))

    @property
    def attached(self) -> bool:
        """True between the start and the end of training (outside, e.g. a lone ``validate``, the
        batch hooks do nothing)."""
        return self.probe is not None and not self.probe.closed

    def _guard(self, what: str, fn: Any) -> None:
        guarded(self._warned, what, fn)
