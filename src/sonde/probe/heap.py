"""A one-time hint when the training process page-faults thousands of times per step.

With glibc's default malloc a CPU training loop often gives the top of its heap back to the OS
after each step's peak and faults it in again, 4 KiB at a time, at the next step. On this
project's benchmark machine that churn cost an unmonitored 3-conv CNN a fifth to a third of its
step (4,500-5,300 faults per step; 33-42 ms per step, 26.5 ms with the heap kept), and the user
has no way to see it. The probe counts the process's minor page faults over a window of training
steps after warm-up (one ``getrusage`` per step) and, when they pass :data:`FAULTS_PER_STEP` and
would take at least :data:`SHARE` of the step at :data:`FAULT_COST` each, says so once in the log
with the fix. ``SONDE_HEAP_HINT=0`` turns the check off.

Example:
    >>> check = HeapChurnCheck(enabled=False)
    >>> check.step()  # once per training step; silent unless the process churns its heap
"""

from __future__ import annotations

import logging
import os
import time

try:
    import resource
except ImportError:  # Windows: no getrusage, and no glibc either
    resource = None  # type: ignore[assignment]

__all__ = ["FAULTS_PER_STEP", "FAULT_COST", "SHARE", "WINDOW", "HeapChurnCheck", "applicable"]

log = logging.getLogger("sonde")

#: Minor page faults per training step from which the hint is given...
FAULTS_PER_STEP = 1000
#: ...if at this many seconds each (a low estimate: 1-3 µs per fault measured here, the 4 KiB
#: page zeroed included) they take at least this share of the step.
FAULT_COST, SHARE = 1e-6, 0.05
#: The training steps measured (the first ones warm up the allocator and the probe).
WINDOW = (5, 25)
#: Environment variables that show the heap is already looked after.
_TUNED = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _glibc() -> bool:
    if resource is None:
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


def applicable() -> bool:
    """glibc, no allocator settings or preloaded allocator, and the hint not turned off."""
    return (os.environ.get("SONDE_HEAP_HINT", "1") != "0" and not any(os.environ.get(k) for k in _TUNED)
            and _glibc())


class HeapChurnCheck:
    """Counts page faults over :data:`WINDOW` training steps and logs the hint once if they are many."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = applicable() if enabled is None else enabled
        self.steps = 0
        self._start: tuple[int, float] = (0, 0.0)

    def step(self) -> None:
        """Call at the start of every training step."""
        if not self.enabled:
            return
        self.steps += 1
        if self.steps == WINDOW[0]:
            self._start = (_faults(), time.perf_counter())
        elif self.steps == WINDOW[1]:
            self.enabled = False
            steps = WINDOW[1] - WINDOW[0]
            per_step = (_faults() - self._start[0]) / steps
            seconds = (time.perf_counter() - self._start[1]) / steps
            if per_step >= FAULTS_PER_STEP and per_step * FAULT_COST >= SHARE * seconds:
                log.warning(
                    "sonde: this process takes %s page faults per training step (%.1f ms per step; at 1-3 us each, "
                    "%.0f%% of it or more): glibc's malloc gives the heap back to the OS after each step and faults "
                    "it in again, page by page. Keeping it is a free speed-up on CPU: start Python with "
                    "MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432 (or preload jemalloc or "
                    "tcmalloc); a small CNN went from 33-42 ms to 26.5 ms per step that way. SONDE_HEAP_HINT=0 turns "
                    "this check off.",
                    f"{per_step:,.0f}", seconds * 1e3, 100 * per_step * FAULT_COST / seconds,
                )
