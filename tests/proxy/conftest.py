"""Fixtures for the proxy acceptance tests: a database and proxies shared by one test module.

Starting a proxy process costs about a second; modules whose tests share a configuration share one proxy
and one database, and each test creates (and drops) the tables it uses.
"""
from __future__ import annotations

import pytest

from tests.support.proxy import ProxyProcess, upstream_entry


@pytest.fixture(scope="module")
def module_proxy_factory(pg):
    """Like proxy_factory, for proxies that live as long as the test module."""
    started: list[ProxyProcess] = []

    def make(dbname: str, **config) -> ProxyProcess:
        config.setdefault("databases", {dbname: upstream_entry(pg, dbname)})
        proxy = ProxyProcess(config)
        started.append(proxy)
        return proxy.start()

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def items(pg, module_db):
    """A fresh `items (id int primary key, label text)` table in the module's database."""
    pg.psql("DROP TABLE IF EXISTS items; CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL)",
            dbname=module_db)
    yield "items"
    pg.psql("DROP TABLE IF EXISTS items", dbname=module_db, check=False)
