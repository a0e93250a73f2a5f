"""Alerts: Records with metric ``alert`` and a readable ``message`` when a layer goes wrong.

A metric of Records: it reads what the other metrics already emit (nothing is captured or
computed for it, so it is on by default) and adds an alert at the step a problem *starts*
(it is not repeated while the problem lasts; it is raised again if the problem goes away and
comes back):

* **dead units**: ``zero_frac`` of a layer's ``activations`` above ``dead_frac`` (0.9) after
  ``warmup`` steps;
* **update ratio**: a weight's ``update_ratio`` (``weight_updates``) outside ``update_ratio``
  (1e-5…1e-1) after ``warmup`` steps; biases are left out (a bias near zero makes the ratio
  meaningless);
* **saturation collapse**: a layer's ``saturation`` below ``collapse`` (0.5) × the highest value
  it had in the run, after ``warmup`` steps;
* **NaN/Inf**: the *first* layer, in the order the step computed them (forward order, then
  backward, then the optimizer), whose tensors hold non-finite values (``nonfinite_frac``), once
  per episode.

An optimizer step that a ``GradScaler`` skipped (inf/NaN gradients) comes as an alert of its own
(layer ``""``, topic ``weight_updates``, from the torch probe); the zero updates of that step
raise no update-ratio alert.

The probe logs each alert (logger ``sonde``, WARNING), unless one of its sinks shows alerts itself
(the console sink prints an ``ALERT`` line): each alert reaches the user once.

Example:
    >>> from sonde.records import Record
    >>> a = Alerts(warmup=0)
    >>> [r.message for r in a.watch([Record("run", 5, "train", "fc1", "activations", "zero_frac", 0.97)])]
    ["layer 'fc1': 97% of its activations are exactly zero at step 5 (dead units; threshold 90%)"]
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from sonde.errors import ConfigError
from sonde.metrics.base import Capture, Metric
from sonde.records import Record

__all__ = ["Alerts"]

#: The metrics :meth:`Alerts._check` reads (``nonfinite_frac`` has its own rule); others are skipped.
_CHECKED = frozenset({"zero_frac", "update_ratio", "saturation"})


class Alerts(Metric):
    """Alert Records (metric ``alert``, value 1.0, text in ``Record.message``) at the onset of a problem.

    Args:
        dead_frac: ``zero_frac`` of activations above which a layer's units count as mostly dead.
        warmup: steps before the dead-unit, update-ratio and saturation rules apply.
        update_ratio: the healthy (low, high) range of a weight's update ratio.
        collapse: saturation below this share of the layer's peak is a collapse.
        nonfinite: whether to name the first layer where NaN or Inf appears.

    Example:
        ``sonde.probe(model, metrics=[*sonde.metrics.DEFAULT_METRICS, sonde.metrics.Alerts(dead_frac=0.8)])``
    """

    name = "alerts"
    outputs = ("alert",)
    topics: ClassVar[tuple[str, ...]] = ()  # reads Records, captures nothing
    watches: ClassVar[bool] = True
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"dead_frac": (0.0, 1.0), "warmup": (0, 2**31 - 1),
                                                       "collapse": (0.0, 1.0)}

    def __init__(
        self,
        *,
        dead_frac: float = 0.9,
        warmup: int = 100,
        update_ratio: tuple[float, float] = (1e-5, 1e-1),
        collapse: float = 0.5,
        nonfinite: bool = True,
    ) -> None:
        super().__init__()
        low, high = update_ratio
        if not (0 < dead_frac <= 1 and 0 <= low < high and 0 < collapse < 1 and warmup >= 0):
            raise ConfigError(
                f"Alerts expects 0 < dead_frac <= 1, 0 <= low < high update_ratio, 0 < collapse < 1 and "
                f"warmup >= 0; got dead_frac={dead_frac!r}, update_ratio={update_ratio!r}, "
                f"collapse={collapse!r}, warmup={warmup!r}"
            )
        self.check_settings(dead_frac=dead_frac, warmup=warmup, collapse=collapse)
        self.dead_frac, self.warmup, self.update_ratio = dead_frac, warmup, (low, high)
        self.collapse, self.nonfinite = collapse, nonfinite
        self._lock = threading.Lock()
        self._active: set[tuple[str, ...]] = set()  # problems alerted and not over yet
        self._peak: dict[tuple[str, str, str], float] = {}
        # NaN/Inf episodes per phase. Records may arrive out of step order (the server's evaluator
        # computes layers on several workers), so an episode is bounded by steps, not by arrival:
        self._nonfinite_since: dict[str, int] = {}  # phase -> step the current episode began
        self._nonfinite_until: dict[str, int] = {}  # phase -> finite step that ended the last episode
        self._skipped: set[tuple[str, int]] = set()  # (phase, step) of optimizer steps a GradScaler skipped

    def combine(self, other: Metric) -> Metric | None:
        # One set of alerts per probe: a configured Alerts given after the default one replaces it.
        return other if isinstance(other, Alerts) else None

    def clone(self) -> Metric:
        return self  # never cloned per layer: one watcher sees the whole run

    def update(self, capture: Capture) -> None:
        """Nothing to capture: alerts read Records."""

    def compute(self) -> dict[str, Any]:
        return {}

    def watch(self, records: Sequence[Record]) -> list[Record]:
        """The alerts that ``records`` (one batch, in the order they were computed) start."""
        out: list[Record] = []
        with self._lock:
            first_nonfinite: dict[tuple[str, int], Record] = {}
            finite_steps: set[tuple[str, int]] = set()
            for r in records:
                if r.metric == "alert" and r.topic == "weight_updates" and not r.layer:
                    self._skipped.add((r.phase, r.step))  # its updates are zero by design, not stalled
                    continue
                if r.metric == "nonfinite_frac" and self.nonfinite:
                    bad = not (isinstance(r.value, float) and r.value == 0.0)
                    if bad:
                        first_nonfinite.setdefault((r.phase, r.step), r)
                    else:
                        finite_steps.add((r.phase, r.step))
                    continue
                if r.metric not in _CHECKED:
                    continue
                message = self._check(r)
                if message is not None:
                    out.append(r._replace(metric="alert", value=1.0, message=message))
            for phase, step in sorted(finite_steps - set(first_nonfinite)):
                since = self._nonfinite_since.get(phase)
                if since is not None and step > since:  # a finite step after the episode began ends it
                    del self._nonfinite_since[phase]
                    self._nonfinite_until[phase] = step
            for (phase, step), r in first_nonfinite.items():
                if phase in self._nonfinite_since or step < self._nonfinite_until.get(phase, -1):
                    continue  # the episode is on, or this step belonged to one that is over
                self._nonfinite_since[phase] = step
                where = [x.layer or "(network)" for x in records
                         if x.metric == "nonfinite_frac" and x.phase == phase and x.step == step
                         and not (isinstance(x.value, float) and x.value == 0.0)]
                others = len(dict.fromkeys(where)) - 1
                message = (f"NaN/Inf first appeared at step {step} in layer {r.layer or '(network)'!r} "
                           f"({r.topic}: {_share(r.value)} of its values are not finite)")
                if others > 0:
                    message += f"; {others} later layer(s) followed"
                out.append(r._replace(metric="alert", value=1.0, message=message))
        return out

    def _check(self, r: Record) -> str | None:
        if not isinstance(r.value, float) or math.isnan(r.value):
            return None
        value = r.value
        if r.metric == "zero_frac" and r.topic == "activations":
            dead = r.step >= self.warmup and value > self.dead_frac
            return self._onset(("dead", r.phase, r.layer), dead, lambda: (
                f"layer {r.layer!r}: {value:.0%} of its activations are exactly zero at step {r.step} "
                f"(dead units; threshold {self.dead_frac:.0%})"))
        if r.metric == "update_ratio" and r.topic == "weight_updates":
            if (r.phase, r.step) in self._skipped:
                return None
            low, high = self.update_ratio
            outside = r.step >= self.warmup and not low <= value <= high
            return self._onset(("ratio", r.phase, r.layer), outside, lambda: (
                f"layer {r.layer!r}: weight update ratio {value:.3g} at step {r.step} is "
                f"{'below' if value < low else 'above'} the healthy range {low:g}…{high:g} "
                f"({'learning has stalled' if value < low else 'updates too large: lower the learning rate'})"))
        if r.metric == "saturation":
            key = (r.phase, r.layer, r.topic)
            peak = max(self._peak.get(key, 0.0), value)
            self._peak[key] = peak
            collapsed = r.step >= self.warmup and peak > 0 and value < self.collapse * peak
            return self._onset(("saturation", *key), collapsed, lambda: (
                f"layer {r.layer!r}: saturation collapsed to {value:.3g} at step {r.step}, under "
                f"{self.collapse:.0%} of its peak {peak:.3g} (its {r.topic} now span far fewer directions)"))
        return None

    def _onset(self, key: tuple[str, ...], bad: bool, message: Any) -> str | None:
        if not bad:
            self._active.discard(key)
            return None
        if key in self._active:
            return None
        self._active.add(key)
        return str(message())


def _share(value: Any) -> str:
    try:
        share = float(value)
    except (TypeError, ValueError):
        return "some"
    return "some (NaN)" if math.isnan(share) else f"{share:.1%}"
