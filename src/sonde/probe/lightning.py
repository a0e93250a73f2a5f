"""``sonde.lightning.SondeCallback``: probes for a Lightning ``Trainer``.

The callback attaches a probe to the ``LightningModule`` when fitting starts, with the trainer's
first optimizer (its steps are sonde's steps, so gradient accumulation and manual optimization
count optimizer steps, not batches). Every batch starts a pass for the probe even when
``training_step`` calls a submodule (``self.net(x)``) rather than the module's own forward. Each
training batch logs its ``loss`` (what ``training_step`` returned: the tensor, or ``"loss"`` of
the dict) and, when the batch is ``(inputs, labels)`` with integer labels, the ``labels`` and the
``outputs``: the ``"outputs"`` entry of the returned dict, else what the module's own forward
returned in that batch (``self(x)``); that gives ``train_accuracy`` with no change to the module.
Validation batches are recorded under the ``eval`` phase. Epoch ends mark ``reset="epoch"``
metrics; the probe closes when fitting ends, or with the run marked failed when it raises. With
automatic optimization the step runs ``training_step`` inside ``optimizer.step(closure)``: the
probe captures gradients after the closure's backward, the ones the step consumes.

Works with the ``lightning`` package (``lightning.pytorch``), else ``pytorch_lightning``.
"""

from __future__ import annotations

from typing import Any

import torch

from sonde.probe.callbacks import CallbackProbe
from sonde.probe.torch import TorchProbe

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback  # type: ignore[assignment]

__all__ = ["SondeCallback"]


class SondeCallback(Callback):  # type: ignore[misc]
    """Probe a Lightning ``Trainer``'s module while it fits.

    Args:
        **probe_kwargs: :func:`sonde.probe`'s keywords except ``model`` and ``optimizer``, which
            come from the trainer (``run``, ``store``, ``server``, ``layers``, ``every``, ...).

    Example:
        >>> import lightning, sonde.lightning                                   # doctest: +SKIP
        >>> trainer = lightning.Trainer(max_epochs=3,                          # doctest: +SKIP
        ...                             callbacks=[sonde.lightning.SondeCallback(run="resnet")])
        >>> trainer.fit(module, train_loader)                                   # doctest: +SKIP
    """

    def __init__(self, **probe_kwargs: Any) -> None:
        self._attached = CallbackProbe(**probe_kwargs)
        self._forward_output: Any = None  # what the module's forward returned in this batch

    @property
    def probe(self) -> TorchProbe | None:
        """The probe of the fit running now (None before and after)."""
        return self._attached.probe

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._forward_output = None
        self._attached.attach(pl_module, list(trainer.optimizers), self._on_forward)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._forward_output = None
        self._attached.begin_batch()

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._forward_output = None
        self._attached.begin_batch()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Automatic optimization hands callbacks the loss divided by accumulate_grad_batches.
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._log(pl_module, outputs, batch, scale)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._log(pl_module, outputs, batch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._attached.end_epoch()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close("failed")

    def _close(self, status: str) -> None:
        self._forward_output = None
        self._attached.close(status)

    def _on_forward(self, module: Any, args: Any, output: Any) -> None:
        self._forward_output = output

    def _log(self, pl_module: Any, step_output: Any, batch: Any, scale: int = 1) -> None:
        loss = predictions = None
        if isinstance(step_output, torch.Tensor):
            loss = step_output
        elif isinstance(step_output, dict):
            loss, predictions = step_output.get("loss"), step_output.get("outputs")
        if predictions is None:
            predictions = self._forward_output
        self._forward_output = None
        labels = None
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
            labels = batch[1] if not batch[1].is_floating_point() else None
        if not (isinstance(predictions, torch.Tensor) and labels is not None
                and predictions.shape[:1] == labels.shape[:1]):
            predictions = None  # not one prediction per label: no accuracy
        if isinstance(loss, torch.Tensor):
            loss = loss * scale if scale != 1 else loss
        else:
            loss = None
        self._attached.log(loss=loss, labels=labels, outputs=predictions)
