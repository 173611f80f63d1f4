"""Redis killed mid-run: clients see no error while it is down (the cache steps aside), caching resumes when it
returns, and a write made while it was down is never hidden by an entry from before, even when Redis comes
back with its old snapshot (the old entry and the old table generations)."""
from __future__ import annotations

import time

import pytest
import redis

from tests.cache_e2e.conftest import cache_section, cache_stats, connect, hits, proxy_config, until_hit, wait_serving
from tests.cache_e2e.workload import Run, counters_sql
from tests.support.services import RedisServer

DOWN_SECONDS = 4


@pytest.fixture
def own_redis():
    server = RedisServer().start()
    yield server
    server.destroy()


@pytest.fixture
def counters(pg, fresh_db):
    pg.psql(counters_sql(), dbname=fresh_db)
    return fresh_db


@pytest.fixture
def proxy(pg, own_redis, counters, proxy_factory):
    proxy = proxy_factory(**proxy_config(pg, counters, own_redis.url, cache=cache_section(own_redis.url)))
    wait_serving(proxy)
    return proxy


def kill(server: RedisServer) -> None:
    """SIGKILL: no shutdown, no save; the port and the data directory stay for a restart."""
    server.proc.kill()
    server.proc.wait()
    server.proc = None


def test_clients_see_no_error_while_redis_is_down_and_hits_resume_when_it_returns(proxy, own_redis, counters):
    dsn = proxy.dsn(counters)
    run = Run().start([dsn, dsn], [dsn] * 4)
    try:
        with connect(proxy, counters) as conn:
            until_hit(proxy, lambda: conn.execute("SELECT v FROM counters WHERE id = 1").fetchall())
        killed = time.monotonic()
        kill(own_redis)
        time.sleep(0.5)                                   # lookups in flight at the kill have finished
        down_start = cache_stats(proxy)
        time.sleep(DOWN_SECONDS)
        down_end = cache_stats(proxy)
        restarted = time.monotonic()
        own_redis.start()                                 # same port, empty
        with connect(proxy, counters) as conn:
            until_hit(proxy, lambda: conn.execute("SELECT v FROM counters WHERE id = 2").fetchall())
        time.sleep(1)
    finally:
        run.finish()
    reads_while_down = sum(1 for _, start, _ in run.reads if killed < start < restarted)
    writes_while_down = sum(1 for acks in run.acks.values() for t, _ in acks if killed < t < restarted)
    assert run.errors == []
    assert writes_while_down > 10 and reads_while_down > 100
    assert down_end["serving"] == "false" and int(down_end["hits"]) == int(down_start["hits"])
    assert int(down_end.get("bypass:redis_down", 0)) > int(down_start.get("bypass:redis_down", 0))
    assert run.stale_reads() == []


def test_a_write_while_redis_is_down_is_read_after_redis_returns_with_its_old_snapshot(
        proxy, own_redis, counters):
    read = "SELECT v FROM counters WHERE id = 1"
    with connect(proxy, counters) as conn:
        cached = until_hit(proxy, lambda: conn.execute(read).fetchone()[0])
        redis.Redis.from_url(own_redis.url).save()        # the entry and its generations, on disk
        kill(own_redis)
        written = conn.execute("UPDATE counters SET v = 41 WHERE id = 1 RETURNING v").fetchone()[0]
        while_down = conn.execute(read).fetchone()[0]
        own_redis.start()                                 # same directory: loads the snapshot
        before = hits(proxy)
        after_restart = conn.execute(read).fetchone()[0]
        hits_right_after = hits(proxy) - before
        again = until_hit(proxy, lambda: conn.execute(read).fetchone()[0])
    assert (cached, written, while_down, after_restart, again) == (0, 41, 41, 41, 41)
    assert hits_right_after == 0
