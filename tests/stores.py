"""Stores the tests share: SQLite in a temporary file, and PostgreSQL when CI gives one.

PostgreSQL tests run against ``SONDE_TEST_POSTGRES_URL`` (CI: postgresql://postgres@127.0.0.1:5432/test),
each in a schema of its own that is dropped afterwards, so parallel and repeated runs never collide.

The fixtures are imported by ``tests/server/conftest.py`` and ``tests/store/conftest.py`` (as
``from stores import any_store, pg_url``); like ``collect.py`` this lives outside any conftest because
``from conftest import ...`` would pick whichever conftest was imported first.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from sonde.store import Store, open_store

__all__ = ["POSTGRES_ENV", "any_store", "pg_url", "postgres_schema_url"]

POSTGRES_ENV = "SONDE_TEST_POSTGRES_URL"


def postgres_schema_url() -> Generator[str, None, None]:
    """A URL whose connections use a fresh schema; the schema is dropped when the generator closes."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    import psycopg

    schema = f"sonde_test_{uuid.uuid4().hex[:12]}"
    admin_url = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same tests on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        with open_store(tmp_path / "sonde.db") as store:
            yield store
        return
    urls = postgres_schema_url()
    url = next(urls)
    try:
        with open_store(url) as store:
            yield store
    finally:
        urls.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL on a fresh schema (skips without SONDE_TEST_POSTGRES_URL)."""
    urls = postgres_schema_url()
    yield next(urls)
    urls.close()
