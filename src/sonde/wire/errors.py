"""The one error of the protocol: a body that cannot be decoded, with the HTTP status it earns."""

from __future__ import annotations

__all__ = ["WireError"]


class WireError(ValueError):
    """A request body that does not follow the protocol; ``status`` is the HTTP answer (400 or 422).

    Example:
        >>> WireError(422, "record 0: step must be an integer").status
        422
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
