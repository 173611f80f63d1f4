"""No stale reads under concurrent writes: 8 writers and 8 readers through two pgpilot instances sharing one
Redis, with writes through the proxies (never stale) and writes straight to Postgres (stale only within the
decoding delay the proxies measured).

The stress runs last RUN_SECONDS (12 s each, not a minute, to keep the suite short). The writers that bypass
the proxies commit with synchronous_commit on, as production servers do: the test cluster turns it off, and
logical decoding sees a commit only once its WAL is flushed, which would add up to wal_writer_delay (200 ms).
"""
from __future__ import annotations

import bisect
import random
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest

from tests.cache_e2e.conftest import cache_section, cache_stats, connect, proxy_config, wait_serving
from tests.support.proxy import ProxyProcess

RUN_SECONDS = 12
WRITERS = READERS = 8
KEYS = 4                      # counters: few, so every read races writes of its row
WRITE_PAUSE = 0.05            # a writer waits up to this long between writes: readers get hits in between


@dataclass
class Run:
    """What the clients saw: acknowledged writes and reads per counter, and the errors."""

    acks: dict[int, list[tuple[float, int]]] = field(default_factory=lambda: {k: [] for k in range(1, KEYS + 1)})
    reads: list[tuple[int, float, int]] = field(default_factory=list)     # (counter, start, value)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stale_reads(self, allowed_delay: float = 0.0) -> list[tuple[int, int, int, float]]:
        """Reads that returned less than a value acknowledged more than `allowed_delay` seconds before they began:
        (counter, value read, value expected, how long before the read that value was acknowledged)."""
        stale = []
        for k, acks in self.acks.items():
            acks.sort()
            times = [t for t, _ in acks]
            best_so_far = []                 # highest value acknowledged up to each ack
            top = 0
            for _, v in acks:
                top = max(top, v)
                best_so_far.append(top)
            for key, start, value in self.reads:
                if key != k:
                    continue
                i = bisect.bisect_left(times, start - allowed_delay) - 1
                if i >= 0 and value < best_so_far[i]:
                    first_newer = next(t for t, v in acks if v > value)
                    stale.append((k, value, best_so_far[i], start - first_newer))
        return stale


def writer(dsn: str, run: Run, stop: threading.Event, seed: int) -> None:
    rnd = random.Random(seed)
    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None,
                             options="-c synchronous_commit=on") as conn:
            while not stop.is_set():
                k = rnd.randint(1, KEYS)
                v = conn.execute("UPDATE counters SET v = v + 1 WHERE id = %s RETURNING v", [k]).fetchone()[0]
                acked = time.monotonic()
                with run.lock:
                    run.acks[k].append((acked, v))
                time.sleep(rnd.uniform(0, WRITE_PAUSE))
    except Exception as e:  # noqa: BLE001 - every client error is a finding
        run.errors.append(f"writer: {type(e).__name__}: {e}")


def reader(proxy: ProxyProcess, dbname: str, run: Run, stop: threading.Event, seed: int, extended: bool) -> None:
    rnd = random.Random(seed)
    seen = []
    try:
        with connect(proxy, dbname) as conn:
            while not stop.is_set():
                k = rnd.randint(1, KEYS)
                start = time.monotonic()
                if extended:      # Parse/Bind/Describe/Execute/Sync
                    v = conn.execute("SELECT v FROM counters WHERE id = %s", [k]).fetchone()[0]
                else:             # a simple Query
                    v = conn.execute(f"SELECT v FROM counters WHERE id = {k}").fetchone()[0]
                seen.append((k, start, v))
    except Exception as e:  # noqa: BLE001
        run.errors.append(f"reader: {type(e).__name__}: {e}")
    with run.lock:
        run.reads.extend(seen)


def stress(proxies: list[ProxyProcess], dbname: str, writer_dsns: list[str]) -> Run:
    run = Run()
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(writer_dsns[i % len(writer_dsns)], run, stop, i))
               for i in range(WRITERS)]
    threads += [threading.Thread(target=reader, args=(proxies[i % len(proxies)], dbname, run, stop, 100 + i, i % 4 >= 2))
                for i in range(READERS)]
    for t in threads:
        t.start()
    time.sleep(RUN_SECONDS)
    stop.set()
    for t in threads:
        t.join(30)
    return run


@pytest.fixture
def counters(pg, fresh_db):
    pg.psql(f"CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);"
            f"INSERT INTO counters SELECT g, 0 FROM generate_series(1, {KEYS}) g", dbname=fresh_db)
    return fresh_db


@pytest.fixture
def two_proxies(pg, redis_server, counters, proxy_factory):
    """Two pgpilot instances in front of the same database, sharing one Redis (one key prefix)."""
    section = cache_section(redis_server.url)
    config = proxy_config(pg, counters, redis_server.url, cache=section, pool_size=8)
    proxies = [proxy_factory(**config), proxy_factory(**config)]
    for p in proxies:
        wait_serving(p)
    return proxies


def totals(proxies: list[ProxyProcess], name: str) -> list[float]:
    return [float(cache_stats(p)[name]) for p in proxies]


def test_writes_through_either_proxy_are_never_read_stale(two_proxies, counters):
    hits_before = totals(two_proxies, "hits")
    run = stress(two_proxies, counters, [p.dsn(counters) for p in two_proxies])
    hits_during = [a - b for a, b in zip(totals(two_proxies, "hits"), hits_before)]
    stale = run.stale_reads()
    writes = sum(len(a) for a in run.acks.values())
    print(f"\nthrough the proxies: {writes} writes, {len(run.reads)} reads, hits per proxy {hits_during}, "
          f"stale {len(stale)}")
    assert run.errors == []
    assert writes > 100 and len(run.reads) > 1000
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
    writes = sum(len(a) for a in run.acks.values())
    print(f"\nstraight to Postgres: {writes} writes, {len(run.reads)} reads, hits per proxy {hits_during}, "
          f"decoded invalidations {decoded}, decoding delay max {bound * 1000:.1f} ms, stale reads within it "
          f"{len(within)} (oldest {max((s[3] for s in within), default=0) * 1000:.1f} ms)")
    assert run.errors == []
    assert writes > 100 and len(run.reads) > 1000
    assert all(h > 0 for h in hits_during), "the cache served no hits: the run proves nothing"
    assert all(d > 0 for d in decoded) and bound > 0
    assert beyond == [], f"{len(beyond)} reads stale beyond the {bound:.3f}s decoding delay: {beyond[:5]}"
