"""Fixtures for the result cache: a ResultCache on a fresh database and a private key prefix in the shared Redis."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from proxy.cache import CacheContext, ResultCache
from proxy.config import CacheConfig


def cache_config(redis_url: str | None, **overrides) -> CacheConfig:
    """Settings for tests: generous timeouts (the machine is shared), fast polling, a private key prefix."""
    values = dict(enabled=True, redis_url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}:", redis_timeout=1.0,
                  breaker_failures=2, breaker_cooldown=0.2, decode_interval=0.005, catalog_check_interval=0.2)
    values.update(overrides)
    return CacheConfig(**values)


@pytest.fixture
def make_cache(pg, redis_server, fresh_db):
    """make_cache(**config) -> a ResultCache (not started) on `fresh_db`; the test starts and stops it."""
    def make(redis_url: str | None = redis_server.url, dbname: str = fresh_db, **overrides) -> ResultCache:
        return ResultCache(cache_config(redis_url, **overrides), {dbname: pg.dsn_for(dbname)})
    return make


def context(database: str, role: str = "postgres", **settings: str) -> CacheContext:
    settings.setdefault("search_path", '"$user", public')
    return CacheContext(database, role, settings)


async def settled(cache: ResultCache, sql: str | bytes, ctx: CacheContext, timeout: float = 15.0):
    """classify() until the background analysis has answered."""
    sql = sql.encode() if isinstance(sql, str) else sql
    deadline = time.monotonic() + timeout
    while True:
        v = cache.classify(sql, ctx)
        if v.reason != "pending" or time.monotonic() > deadline:
            return v
        await asyncio.sleep(0.01)


async def eventually(predicate, timeout: float = 15.0, interval: float = 0.01):
    """Await until predicate() (sync or async) is true; the last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def started(cache: ResultCache) -> ResultCache:
    await cache.start()
    assert await cache.wait_ready(20.0), cache.stats()
    return cache
