"""Helpers for the query log tests: events, a writer configuration, and reading the log store back."""
from __future__ import annotations

import time

import psycopg
import pytest

from proxy.config import QueryLogConfig
from proxy.querylog import QueryEvent


def make_event(sql: str, xact_id: int = 0, **overrides) -> QueryEvent:
    fields = dict(ts=time.time(), duration_us=1000, wait_us=0, sql=sql, rows=1, bytes_out=100, sqlstate=None,
                  database="app", username="alice", application_name="shop", client_addr="127.0.0.1",
                  backend_pid=4242, xact_id=xact_id, in_transaction=False, protocol="simple")
    fields.update(overrides)
    return QueryEvent(**fields)


def make_config(tmp_path, **overrides) -> QueryLogConfig:
    values = dict(flush_interval=0.05, spool_dir=str(tmp_path / "spool"), write_timeout=2.0,
                  reconnect_max_backoff=0.2, stop_timeout=10.0)
    values.update(overrides)
    return QueryLogConfig(**values)


def fetch(dsn: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def store_dsn(pg, fresh_db) -> str:
    """A fresh, empty database to be the log store (the writer creates the schema)."""
    return pg.dsn_for(fresh_db)
