"""When a request is worth sending again, and how long to wait before it.

Every client of the protocol (the remote sink's outbox, the evaluator's writer, the aggregator's
forwarder, the frontend's forwarding of tensors) reads the same rule: :func:`retryable` says
whether an answer may succeed later (the server is busy, away behind a proxy, or restarting);
:class:`Backoff` spaces the attempts, doubling up to a ceiling.

Example:
    >>> retryable(503), retryable(422), refused(401)
    (True, False, True)
    >>> wait = Backoff(0.1, 0.4)
    >>> [wait.next() for _ in range(4)]
    [0.1, 0.2, 0.4, 0.4]
"""

from __future__ import annotations

__all__ = ["AUTH_STATUS", "RETRY_STATUS", "Backoff", "delay", "refused", "retryable"]

#: Answers that may succeed when sent again: a timeout, too early, too many, or a server in trouble.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Answers that refuse the token: they wait for the operator, not for the server.
AUTH_STATUS = frozenset({401, 403})


def retryable(status: int) -> bool:
    """Whether an answer with ``status`` may succeed if the same request is sent again."""
    return status in RETRY_STATUS


def refused(status: int) -> bool:
    """Whether ``status`` says the bearer token was refused."""
    return status in AUTH_STATUS


def delay(tries: int, first: float, most: float) -> float:
    """The wait before attempt ``tries + 1``: ``first`` doubled ``tries`` times, at most ``most``."""
    return min(first * 2**tries, most)


class Backoff:
    """Waits that double from ``first`` up to ``most``; :meth:`reset` after a success."""

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self.current = first

    def next(self) -> float:
        """The wait to use now; the following one is twice as long (up to ``most``)."""
        wait, self.current = self.current, min(self.current * 2, self.most)
        return wait

    def reset(self) -> None:
        self.current = self.first
