"""The status a run is shown with: its stored status, or ``stalled`` when its writer went silent.

A run is stored as ``running``, ``finished`` or ``failed``. While it is open its writer stamps
the run's heartbeat (``runs.heartbeat_at``): every write of Records does, and the store sink
and the remote sink beat every :data:`~sonde.sinks.base.HEARTBEAT_EVERY` seconds even when
training writes nothing (a step that takes minutes). A process that is killed, or loses power,
never marks its run finished or failed; its heartbeat just stops. Readers (``Store.runs``,
``Store.run_info``, the REST API, the dashboard) then show a ``running`` run whose heartbeat is
older than ``stall_after`` seconds as ``stalled``. The stored status stays ``running``, so a run
resumed with ``resume=True`` is shown running again from its first new heartbeat.

Example:
    >>> shown_status("running", heartbeat_at=100.0, now=130.0)
    'running'
    >>> shown_status("running", heartbeat_at=100.0, now=200.0)
    'stalled'
    >>> shown_status("finished", heartbeat_at=100.0, now=1e9)
    'finished'
"""

from __future__ import annotations

import math
import os

from sonde.errors import ConfigError

__all__ = ["STALL_AFTER", "STALL_AFTER_ENV", "STATUSES", "shown_status", "stall_after_default"]

#: Seconds without a heartbeat after which a running run is shown as stalled. The writers beat
#: every 5 s (``sonde.sinks.base.HEARTBEAT_EVERY``), so this leaves room for a busy machine or a
#: server that was away for a while.
STALL_AFTER = 60.0

#: The environment variable that overrides :data:`STALL_AFTER` (``SONDE_STALL_AFTER=300 sonde serve``).
STALL_AFTER_ENV = "SONDE_STALL_AFTER"

#: Every status a reader can see: the stored ones and the derived ``stalled``.
STATUSES = ("running", "stalled", "finished", "failed")


def stall_after_default() -> float:
    """:data:`STALL_AFTER`, or the seconds in ``$SONDE_STALL_AFTER`` when set.

    Raises:
        ConfigError: the variable is set to something that is not a positive number of seconds.
    """
    text = os.environ.get(STALL_AFTER_ENV, "").strip()
    if not text:
        return STALL_AFTER
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{STALL_AFTER_ENV} must be a positive number of seconds (e.g. 300); got {text!r}")
    return seconds


def shown_status(status: str, heartbeat_at: float | None, *, now: float, stall_after: float = STALL_AFTER) -> str:
    """``stalled`` for a ``running`` run whose last heartbeat is more than ``stall_after`` seconds old,
    else the stored ``status``. A run without any heartbeat is taken as alive.

    Args:
        status: the stored status (``running``, ``finished`` or ``failed``).
        heartbeat_at: the run's last heartbeat, UTC seconds since the epoch.
        now: the time to judge at, UTC seconds since the epoch.
        stall_after: seconds of silence after which a running run is stalled.
    """
    if status == "running" and heartbeat_at is not None and now - heartbeat_at > stall_after:
        return "stalled"
    return status
