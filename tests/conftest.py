"""Shared fixtures: a private PostgreSQL and Redis per test session, and pgpilot proxies in front of them.

PGPILOT_TEST_DSN / PGPILOT_TEST_REDIS point the tests at existing servers instead.
"""
from __future__ import annotations

import os
import uuid

import pytest

from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.services import ExternalPg, ExternalRedis, PgCluster, RedisServer


@pytest.fixture(scope="session")
def pg():
    dsn = os.environ.get("PGPILOT_TEST_DSN")
    cluster = ExternalPg(dsn) if dsn else PgCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def redis_server():
    url = os.environ.get("PGPILOT_TEST_REDIS")
    server = ExternalRedis(url) if url else RedisServer().start()
    yield server
    server.destroy()


def _throwaway_db(pg):
    name = "t_" + uuid.uuid4().hex[:10]
    pg.psql(f"CREATE DATABASE {name}")
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture
def fresh_db(pg):
    """A new empty database on the session's cluster, dropped afterwards."""
    yield from _throwaway_db(pg)


@pytest.fixture(scope="module")
def module_db(pg):
    """An empty database shared by one test module, dropped afterwards."""
    yield from _throwaway_db(pg)


@pytest.fixture
def proxy_factory(pg):
    """Start pgpilot proxies: proxy_factory(databases=..., pool_size=..., ...) -> ProxyProcess."""
    started: list[ProxyProcess] = []

    def make(dbname: str | None = None, start: bool = True, **config) -> ProxyProcess:
        config.setdefault("databases", {dbname or pg.dbname: upstream_entry(pg, dbname or pg.dbname)})
        proxy = ProxyProcess(config)
        started.append(proxy)
        return proxy.start() if start else proxy

    yield make
    for p in started:
        p.stop()
