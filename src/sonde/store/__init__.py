"""The SQL store of runs, layers and Records (SQLAlchemy Core; SQLite by default, PostgreSQL too).

Example:
    >>> from sonde.store import open_store
    >>> store = open_store("sonde.db")      # doctest: +SKIP
    >>> store.runs()                        # doctest: +SKIP
"""

from __future__ import annotations

from sonde.store.store import Store, open_store

__all__ = ["Store", "open_store"]
