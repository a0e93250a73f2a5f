"""``test_accuracy`` and ``test_loss`` over a user's held-out loader, every N steps.

Configured, never by name alone (it needs the data)::

    sonde.probe(model, optimizer=opt, metrics=[..., sonde.metrics.TestAccuracy(test_loader, every=100,
                                                                             loss_fn=torch.nn.functional.cross_entropy)])

At each step the schedule accepts, before that step's training forward (so with the weights that
step trains from), the probe runs the whole loader through the model with gradients off and
every module in eval mode, then puts each module's mode back; the dropout RNG state is saved and
restored, nothing is captured by the other metrics, and BatchNorm running statistics are not
touched (eval mode). It records, in phase ``eval`` on the network-wide layer ``""`` and topic
``outputs``:

* ``test_accuracy`` = Σ correct / Σ counted over **all** batches (argmax over the last dimension,
  (B,) logits are binary, labels < 0 left out) — weighted by samples, not a mean of batch means;
* ``test_loss`` (when ``loss_fn`` is given) = the mean loss per counted label: a scalar
  (mean-reduced) loss is weighted by the batch's counted labels; a per-element loss
  (``reduction="none"``, padded positions 0 as ``ignore_index`` gives them) is summed and divided
  by the counted labels.

The loader yields ``(inputs, labels)`` pairs (a tuple or list; further items are ignored);
inputs are moved to the model's device. This runs on the training thread (it uses the model),
so it costs one pass over the loader per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from sonde import functional as F
from sonde.errors import ConfigError
from sonde.metrics.base import Metric
from sonde.schedules import Schedule

__all__ = ["TestAccuracy"]


class TestAccuracy(Metric):
    """Accuracy (and loss) of the model on a held-out loader, weighted by samples.

    Args:
        loader: an iterable of ``(inputs, labels)`` batches, re-iterated at each evaluation
            (a ``torch.utils.data.DataLoader`` or a list).
        every: evaluate at step k when ``k % every == 0`` (default 100), or a schedule.
        loss_fn: optional ``loss_fn(outputs, labels)``, mean-reduced or per element.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
        >>> values = TestAccuracy(data, every=1).evaluate(model)
        >>> sorted(values), 0.0 <= values["test_accuracy"] <= 1.0
        (['test_accuracy'], True)
    """

    __test__ = False  # not a pytest test class, despite the name
    name = "test_accuracy"
    outputs = ("test_accuracy", "test_loss")
    topics = ()

    def __init__(
        self,
        loader: Iterable[Any] | None = None,
        *,
        every: int | Schedule = 100,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if loader is None:
            raise ConfigError(
                "test_accuracy needs the held-out data: pass sonde.metrics.TestAccuracy(test_loader, every=100) "
                "in metrics=[...] instead of the name"
            )
        if not hasattr(loader, "__iter__"):
            raise ConfigError(
                f"TestAccuracy expects an iterable of (inputs, labels) batches, got {type(loader).__name__}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn= expects a callable loss_fn(outputs, labels), got {loss_fn!r}")
        super().__init__(every=every)
        self.loader = loader
        self.loss_fn = loss_fn

    def __deepcopy__(self, memo: dict[int, Any]) -> TestAccuracy:
        return self  # holds a loader; one instance per probe

    def update(self, capture: Any) -> None:
        """Not fed by captures: the probe calls :meth:`evaluate`."""

    def compute(self) -> dict[str, Any]:
        return {}

    def due_at(self, step: int, default: Schedule) -> bool:
        """Whether the probe evaluates at ``step`` (this metric's ``every``)."""
        return bool((self.schedule or default)(step))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Run the loader through ``model`` as it is now; ``{test_accuracy, test_loss}``.

        The caller (the probe) has already switched off gradients and set eval mode.
        """
        device = next((p.device for p in model.parameters()), None)
        correct = counted = 0.0
        loss_sum = loss_count = 0.0
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ConfigError(
                    f"TestAccuracy's loader must yield (inputs, labels) pairs, got {type(batch).__name__}"
                )
            inputs, labels = batch[0], torch.as_tensor(batch[1])
            if device is not None and isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device)
            outputs = model(inputs)
            if not isinstance(outputs, torch.Tensor):
                raise ConfigError(
                    f"TestAccuracy needs the model to return a tensor of scores, got {type(outputs).__name__}"
                )
            labels = labels.to(outputs.device)
            right, total = F.accuracy_counts(outputs, labels).tolist()
            correct += right
            counted += total
            if self.loss_fn is not None:
                loss = self.loss_fn(outputs, labels).detach().double()
                loss_sum += float(loss.sum()) if loss.numel() > 1 else float(loss) * total
                # per-element losses of padded positions are 0 (ignore_index): divide by the counted labels
                loss_count += total if loss.numel() in (1, labels.numel()) else loss.numel()
        values: dict[str, float] = {}
        if counted:
            values["test_accuracy"] = correct / counted
        if self.loss_fn is not None and loss_count:
            values["test_loss"] = loss_sum / loss_count
        elif self.loss_fn is not None:
            values["test_loss"] = float(np.nan)
        return values
