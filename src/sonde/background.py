"""The CPU time of sonde's background threads, which the overhead budget counts against itself.

The threads that take sonde's Records further (each sink's runner, the store's writer and its
timer, the remote sender) charge the CPU time of each piece of work here: ``with charged():``
measures ``time.thread_time()`` around it, so a thread waiting on a queue, a lock or the network
charges nothing. :class:`sonde.budget.Budget` reads :func:`spent` and counts that time in full,
per recorded step: where training uses every core, it is taken from training, and even on an
idle core a background thread running Python holds the GIL the training thread's Python needs.
The metric worker's computations are timed per metric by the budget itself and are not charged
here.

Example:
    >>> before = spent()
    >>> with charged():
    ...     _ = sum(range(100_000))
    >>> spent() > before
    True
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["charged", "spent"]

_lock = threading.Lock()
_spent = 0.0


@contextlib.contextmanager
def charged() -> Iterator[None]:
    """Charge the calling thread's CPU time inside the block as sonde's background work."""
    start = time.thread_time()
    try:
        yield
    finally:
        seconds = time.thread_time() - start
        global _spent
        with _lock:
            _spent += seconds


def spent() -> float:
    """CPU seconds charged so far in this process (all probes together)."""
    return _spent
