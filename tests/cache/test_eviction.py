"""The in-process tier under pressure, through lookup / fill on real Postgres: which result stays (GDSF keeps
the one that saves the most Postgres time per byte; LRU the most recent)."""
from __future__ import annotations

import asyncio

import pytest

from tests.cache.conftest import context, settled, started


@pytest.fixture
def db(pg, fresh_db):
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text);"
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g", dbname=fresh_db)
    return fresh_db


def read(i: int) -> bytes:
    return b"SELECT id, name FROM items WHERE id = %d" % i


async def fill(cache, ctx, sql: bytes, exec_us: int) -> tuple:
    v = await settled(cache, sql, ctx)
    assert v.cacheable, v
    key = cache.key(ctx, sql)
    entry, token = await cache.lookup(key, v.tables)
    assert entry is None and token is not None
    cache.fill(key, v.tables, token, b"r" * 500, exec_us=exec_us, verdict=v)
    return key, v


@pytest.mark.parametrize("eviction, kept", [("gdsf", True), ("lru", False)])
def test_a_full_l1_keeps_the_costly_result_under_gdsf_and_the_recent_ones_under_lru(make_cache, db, eviction, kept):
    async def body():
        # one process, no Redis: the L1 is the whole cache; room for about three results
        cache = await started(make_cache(redis_url=None, dbname=db, l1_max_bytes=2500, l1_eviction=eviction,
                                         admission_warmup=100))
        try:
            ctx = context(db)
            key, v = await fill(cache, ctx, read(1), exec_us=140_000)
            for i in range(2, 8):
                await fill(cache, ctx, read(i), exec_us=100)
            hit = (await cache.lookup(key, v.tables))[0]
            return hit, cache.stats()
        finally:
            await cache.stop()
    hit, stats = asyncio.run(body())
    assert (hit is not None) is kept
    assert stats["l1_bytes"] <= 2500 and stats["l1_evictions"] + stats["l1_turned_away"] >= 4
