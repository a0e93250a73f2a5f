"""``sonde.transformers.SondeCallback``: probes for a Hugging Face ``Trainer``.

The callback attaches a probe when training begins, to the trainer's model with the trainer's
optimizer (Accelerate's wrapper unwrapped, so that sonde's steps are the optimizer's real steps),
and a forward hook on the model that logs each batch's ``loss`` (the model's own), ``labels`` and
``outputs`` (the logits, when the labels are integer classes) through ``Probe.log``: loss curves
and ``train_accuracy`` with nothing written in the training script. For a causal language model
the logits of position t are scored against the label of position t + 1, as its loss does.
Evaluation passes (``trainer.evaluate``) are recorded under the ``eval`` phase. Epoch ends mark
``reset="epoch"`` metrics; the probe closes at the end of training. The Trainer tells callbacks
nothing when training raises: ``callback.close()`` then records the last step and marks the run
failed (or the next ``train()`` with the same callback closes it as finished).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.training_args import ParallelMode

from sonde.probe.callbacks import CallbackProbe
from sonde.probe.torch import TorchProbe

__all__ = ["SondeCallback"]


def _causal_lm_classes() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - the mapping has lived there since transformers 4.x
        return frozenset()
    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class SondeCallback(TrainerCallback):  # type: ignore[misc]
    """Probe a ``transformers.Trainer``'s model while it trains.

    Args:
        **probe_kwargs: :func:`sonde.probe`'s keywords except ``model`` and ``optimizer``, which
            come from the trainer (``run``, ``store``, ``server``, ``layers``, ``every``, ...).

    Example:
        >>> from transformers import Trainer                               # doctest: +SKIP
        >>> import sonde.transformers                                      # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,    # doctest: +SKIP
        ...                   callbacks=[sonde.transformers.SondeCallback(run="bert-sst2", every=10)])
        >>> trainer.train()                                                # doctest: +SKIP
    """

    def __init__(self, **probe_kwargs: Any) -> None:
        self._attached = CallbackProbe(**probe_kwargs)
        self._shift = False

    @property
    def probe(self) -> TorchProbe | None:
        """The probe of the training running now (None before and after)."""
        return self._attached.probe

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise TypeError("sonde.transformers.SondeCallback: the Trainer passed no model to on_train_begin")
        self._shift = type(model).__name__ in _causal_lm_classes()
        # Under torchrun the Trainer runs the model through DDP (or FSDP), which averages the gradients
        # over the ranks, but hands callbacks the model itself: the probe is told (sonde.probe.torch).
        model._sonde_ranks_average = args.parallel_mode == ParallelMode.DISTRIBUTED
        self._attached.attach(model, [optimizer], self._on_forward, with_kwargs=True)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._attached.end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close("finished")

    def close(self, status: str = "failed") -> None:
        """Close the probe of a training that raised (the Trainer calls no callback then), with
        ``status`` for the run; idempotent, and nothing to do after a training that ended."""
        self._attached.close(status)

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        labels = kwargs.get("labels")
        loss = logits = None
        if isinstance(output, dict):  # ModelOutput is an OrderedDict
            loss, logits = output.get("loss"), output.get("logits")
        elif isinstance(output, (tuple, list)) and labels is not None and output:
            loss = output[0]  # return_dict=False: (loss, logits, ...) when labels are given
        items = kwargs.get("num_items_in_batch")
        if (self._shift and isinstance(loss, torch.Tensor) and items is not None and isinstance(labels, torch.Tensor)
                and labels.dim() >= 2):
            # The Trainer has a causal LM divide its loss by the labelled tokens of the whole optimizer step
            # (every accumulated batch, every rank): this batch's own mean is that times the step's count
            # over this batch's count (on the device, no host read).
            own = (labels[..., 1:] != -100).sum().clamp(min=1)
            loss = loss.detach() * torch.as_tensor(items, device=loss.device) / own
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            labels = logits = None  # regression targets: no accuracy
        elif isinstance(logits, torch.Tensor) and self._shift and logits.dim() == 3:
            logits, labels = logits[:, :-1], labels[:, 1:]
        self._attached.log(loss=loss if isinstance(loss, torch.Tensor) else None, labels=labels,
                           outputs=logits if isinstance(logits, torch.Tensor) else None)
