"""No stale reads under concurrent writes: 8 writers and 8 readers through two pgpilot instances sharing one
Redis, with writes through the proxies (never stale) and writes straight to Postgres (stale only within the
decoding delay the proxies measured).

The stress runs last RUN_SECONDS (12 s each, not a minute, to keep the suite short). Writers commit with
synchronous_commit on, as production servers do: the test cluster turns it off, and logical decoding sees a
commit only once its WAL is flushed, which would add up to wal_writer_delay (200 ms) to the decoding delay.
"""
from __future__ import annotations

import time

import pytest

from tests.cache_e2e.conftest import cache_section, cache_stats, proxy_config, wait_serving
from tests.cache_e2e.workload import Run, counters_sql
from tests.support.proxy import ProxyProcess

RUN_SECONDS = 12
WRITERS = READERS = 8


@pytest.fixture
def counters(pg, fresh_db):
    pg.psql(counters_sql(), dbname=fresh_db)
    return fresh_db


@pytest.fixture
def two_proxies(pg, redis_server, counters, proxy_factory):
    """Two pgpilot instances in front of the same database, sharing one Redis (one key prefix)."""
    config = proxy_config(pg, counters, redis_server.url, cache=cache_section(redis_server.url), pool_size=8)
    proxies = [proxy_factory(**config), proxy_factory(**config)]
    for p in proxies:
        wait_serving(p)
    return proxies


def totals(proxies: list[ProxyProcess], name: str) -> list[float]:
    return [float(cache_stats(p)[name]) for p in proxies]


def stress(proxies: list[ProxyProcess], dbname: str, writer_dsns: list[str]) -> Run:
    readers = [proxies[i % len(proxies)].dsn(dbname) for i in range(READERS)]
    run = Run().start([writer_dsns[i % len(writer_dsns)] for i in range(WRITERS)], readers)
    time.sleep(RUN_SECONDS)
    return run.finish()


def test_writes_through_either_proxy_are_never_read_stale(two_proxies, counters):
    hits_before = totals(two_proxies, "hits")
    run = stress(two_proxies, counters, [p.dsn(counters) for p in two_proxies])
    hits_during = [a - b for a, b in zip(totals(two_proxies, "hits"), hits_before)]
    stale = run.stale_reads()
    print(f"\nthrough the proxies: {run.writes} writes, {len(run.reads)} reads, hits per proxy {hits_during}, "
          f"stale {len(stale)}")
    assert run.errors == []
    assert run.writes > 100 and len(run.reads) > 1000
    assert all(h > 0 for h in hits_during), "the cache served no hits: the run proves nothing"
    assert stale == [], f"{len(stale)} stale reads, first ones: {stale[:5]}"


def test_writes_straight_to_postgres_are_read_stale_only_within_the_measured_decoding_delay(
        pg, two_proxies, counters):
    hits_before = totals(two_proxies, "hits")
    decoded_before = totals(two_proxies, "decoded_invalidations")
    run = stress(two_proxies, counters, [pg.dsn_for(counters)])
    hits_during = [a - b for a, b in zip(totals(two_proxies, "hits"), hits_before)]
    decoded = [a - b for a, b in zip(totals(two_proxies, "decoded_invalidations"), decoded_before)]
    bound = max(totals(two_proxies, "decoding_lag_max_seconds"))
    within = run.stale_reads()
    beyond = run.stale_reads(allowed_delay=bound)
    print(f"\nstraight to Postgres: {run.writes} writes, {len(run.reads)} reads, hits per proxy {hits_during}, "
          f"decoded invalidations {decoded}, decoding delay max {bound * 1000:.1f} ms, stale reads within it "
          f"{len(within)} (oldest {max((s[3] for s in within), default=0) * 1000:.1f} ms)")
    assert run.errors == []
    assert run.writes > 100 and len(run.reads) > 1000
    assert all(h > 0 for h in hits_during), "the cache served no hits: the run proves nothing"
    assert all(d > 0 for d in decoded) and bound > 0
    assert beyond == [], f"{len(beyond)} reads stale beyond the {bound:.3f}s decoding delay: {beyond[:5]}"
