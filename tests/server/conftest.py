"""Stores for the server tests: SQLite, and PostgreSQL when CI gives one (see ``tests/stores.py``)."""

from __future__ import annotations

from stores import any_store, pg_url

__all__ = ["any_store", "pg_url"]
