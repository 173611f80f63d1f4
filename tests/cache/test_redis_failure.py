"""Redis going away mid-flight: the cache steps aside, refuses to serve while invalidations could be lost, and
resumes without a stale entry, even when Redis comes back with an old snapshot of its data."""
from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.cache import resp
from tests.cache.conftest import context, eventually, settled, started
from tests.support.services import RedisServer, free_port

READ = b"SELECT id, name FROM items WHERE id = 1"
WRITE = b"UPDATE items SET name = 'changed' WHERE id = 1"


@pytest.fixture
def db(pg, fresh_db):
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a')", dbname=fresh_db)
    return fresh_db


@pytest.fixture
def own_redis():
    server = RedisServer().start()
    yield server
    server.destroy()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_redis_down_means_bypass_then_no_stale_entry_when_it_returns(pg, make_cache, db, own_redis):
    async def body():
        cache = await started(make_cache(redis_url=own_redis.url, dbname=db))
        try:
            ctx = context(db)
            v = await settled(cache, READ, ctx)
            key = cache.key(ctx, READ)
            _, token = await cache.lookup(key, v.tables)
            cache.fill(key, v.tables, token, b"old rows", exec_us=5000, template="t")
            cache.l1.clear()
            assert await eventually(lambda: _entry(cache, key, v)) == b"old rows"
            # Redis persists what it has now (the entry and its generations), then dies.
            admin = await resp.connect(own_redis.url, 2.0)
            await admin.call("SAVE")
            admin.close()
            own_redis.stop()

            down_lookup = await cache.lookup(key, v.tables)
            pg.psql(WRITE.decode(), dbname=db)                 # a write the cache cannot record
            down_invalidate = await cache.invalidate(cache.writes(WRITE, ctx))
            down_stats = cache.stats()

            # Redis returns from its snapshot: the old entry and the old generations are back.
            await eventually(lambda: _port_free(own_redis.port), timeout=10)
            own_redis.start()                                  # same port, same directory: loads the snapshot
            assert await eventually(lambda: cache.store.serving, timeout=20)
            after = await cache.lookup(key, v.tables)
            return down_lookup, down_invalidate, down_stats, after, cache.stats()
        finally:
            await cache.stop()
    down_lookup, down_invalidate, down_stats, after, stats = asyncio.run(body())
    assert down_lookup == (None, None)
    assert down_invalidate is False
    assert down_stats["store"]["serving"] is False and down_stats["invalidation_failures"] >= 1
    assert set(down_stats["bypass"]) & {"redis_down", "breaker_open", "inconsistent"}
    entry, token = after
    assert entry is None and token is not None            # serving again, and the old entry is unreachable
    assert stats["store"]["recoveries"] >= 1


async def _entry(cache, key, v):
    cache.l1.drop(key)
    return (await cache.lookup(key, v.tables))[0]


def test_without_redis_at_start_the_cache_bypasses_and_starts_serving_when_it_appears(make_cache, db):
    port = free_port()   # nothing listens there yet

    async def body():
        cache = make_cache(redis_url=f"redis://127.0.0.1:{port}/0", dbname=db)
        await cache.start()
        server = None
        try:
            ctx = context(db)
            v = await settled(cache, READ, ctx)
            before = await cache.lookup(cache.key(ctx, READ), v.tables)
            server = RedisServer(port=port).start()
            ready = await cache.wait_ready(20)
            after = await cache.lookup(cache.key(ctx, READ), v.tables)
            return before, ready, after
        finally:
            await cache.stop()
            if server is not None:
                server.destroy()
    before, ready, after = asyncio.run(body())
    assert before == (None, None) and ready and after[1] is not None
