"""Fixtures for the query log acceptance tests: a pgbench database, and a store database read back directly."""
from __future__ import annotations

import subprocess
import uuid

import psycopg
import pytest


def create_database(cluster) -> str:
    name = "t_" + uuid.uuid4().hex[:10]
    cluster.psql(f"CREATE DATABASE {name}")
    return name


@pytest.fixture(scope="module")
def bench_db(pg):
    """A database initialised by `pgbench -i -s 1` straight against Postgres (so the proxy logs none of it)."""
    name = create_database(pg)
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, name],
                   check=True, capture_output=True, text=True)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


def fetch(dsn: str, sql: str, *params) -> list[tuple]:
    """Rows read straight from a database (the log store), never through the proxy."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def count_events(store_dsn: str, database: str, application_name: str) -> int:
    return fetch(store_dsn, "SELECT count(*) FROM pgpilot.query_events WHERE database = %s "
                            "AND application_name = %s", database, application_name)[0][0]
