"""Fixtures for the collector tests: a fresh database that is both the monitored database and the log store."""
from __future__ import annotations

import psycopg
import pytest

from proxy.logstore import ensure_schema_sync


@pytest.fixture
def app_dsn(pg, fresh_db) -> str:
    """DSN of a fresh database holding the log store tables; the collectors monitor it too."""
    dsn = pg.dsn_for(fresh_db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_schema_sync(conn)
    return dsn


@pytest.fixture
def app(app_dsn):
    """An autocommit connection to that database, playing the application."""
    with psycopg.connect(app_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def role(pg, fresh_db):
    """A login role without superuser rights, allowed to connect to the fresh database; dropped afterwards."""
    name = f"watcher_{fresh_db}"
    pg.psql(f"CREATE ROLE {name} LOGIN")
    yield name
    pg.psql(f"DROP OWNED BY {name}", dbname=fresh_db, check=False)
    pg.psql(f"DROP ROLE IF EXISTS {name}", check=False)
