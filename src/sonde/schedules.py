"""When to record: plain functions ``step -> bool``.

Example:
    >>> every(10)(20), every(10)(21)
    (True, False)
    >>> [k for k in range(100) if log_spaced(base=2)(k)]
    [0, 1, 2, 4, 8, 16, 32, 64]
"""

from __future__ import annotations

from collections.abc import Callable

from sonde.errors import ConfigError

__all__ = ["Schedule", "every", "log_spaced"]

Schedule = Callable[[int], bool]


class every:  # noqa: N801 - reads as a function: every(10)
    """Record step ``k`` when ``k % n == 0`` (``n=1``: every step)."""

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"every= expects a positive int, got {n!r}")
        self.n = n

    def __call__(self, step: int) -> bool:
        return step % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n})"


class log_spaced:  # noqa: N801
    """Record step 0 and the steps ``round(base**i)`` for i = 0, 1, 2, ...: dense early, sparse late."""

    def __init__(self, base: float = 2.0) -> None:
        if not base > 1:
            raise ConfigError(f"log_spaced(base=) expects a number > 1, got {base!r}")
        self.base = base

    def __call__(self, step: int) -> bool:
        if step <= 1:
            return True
        value = 1.0
        while value < step:
            value *= self.base
            if round(value) == step:
                return True
        return False

    def __repr__(self) -> str:
        return f"log_spaced({self.base})"


def as_schedule(value: int | Schedule) -> Schedule:
    """``every=N`` as an int, or any callable ``step -> bool``."""
    if callable(value):
        return value
    return every(value)
