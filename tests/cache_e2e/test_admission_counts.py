"""A template the admission declines: each execution is decided (and counted) once, and still reaches Postgres."""
from __future__ import annotations

import time

import psycopg
import pytest

from tests.cache_e2e.conftest import cache_section, cache_stats, connect, proxy_config, wait_serving
from tests.support.proxy import ProxyProcess

READ = "SELECT v FROM declined WHERE id = 1"
WRITE = "UPDATE declined SET v = 'one' WHERE id = 1"   # retires the entry: every read would miss and offer
RUNS = 64


def outcomes(proxy: ProxyProcess) -> dict[str, int]:
    """The counters one cacheable read lands in: a hit, a miss, a bypass (any reason) or still being analysed."""
    stats = cache_stats(proxy)
    return {k: int(v) for k, v in stats.items()
            if k in ("hits", "misses", "uncacheable:pending") or k.startswith("bypass:")}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def settled(proxy: ProxyProcess, run, timeout: float = 30.0) -> None:
    """Run until the statement's analysis is done (the first sights are analysed in the background) and the
    template went through its warm-up into being declined."""
    deadline = time.monotonic() + timeout
    for _ in range(40):
        run()
    while outcomes(proxy).get("bypass:not_admitted", 0) == 0:
        assert time.monotonic() < deadline, f"the template was never declined: {cache_stats(proxy)}"
        run()


@pytest.fixture
def declining_proxy(pg, redis_server, fresh_db):
    pg.psql("CREATE TABLE declined (id int PRIMARY KEY, v text); INSERT INTO declined VALUES (1, 'one')",
            dbname=fresh_db)
    # Every fill saves far less than the bar: after the warm-up the template is declined, explored 1 in 4 times.
    cache = cache_section(redis_server.url, admission_min_saved_us=1e12, admission_warmup=2,
                          admission_explore_every=4)
    proxy = ProxyProcess(proxy_config(pg, fresh_db, redis_server.url, cache=cache, pool_mode="transaction")).start()
    wait_serving(proxy)
    yield proxy, fresh_db
    proxy.stop()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_each_execution_of_a_declined_template_is_counted_once(declining_proxy, protocol):
    proxy, dbname = declining_proxy
    with connect(proxy, dbname) as conn:
        cur = psycopg.ClientCursor(conn) if protocol == "simple" else conn.cursor()
        settled(proxy, lambda: (cur.execute(WRITE), cur.execute(READ).fetchall()))
        before = outcomes(proxy)
        for _ in range(RUNS):
            cur.execute(WRITE)
            assert cur.execute(READ).fetchall() == [("one",)]
        moved = delta(before, outcomes(proxy))
    assert sum(moved.values()) == RUNS, moved
    assert moved.get("bypass:not_admitted", 0) >= RUNS // 2, moved


def test_a_template_declined_again_and_again_is_explored_ever_more_rarely(declining_proxy):
    proxy, dbname = declining_proxy
    with connect(proxy, dbname) as conn:
        settled(proxy, lambda: (conn.execute(WRITE), conn.execute(READ).fetchall()))
        before = outcomes(proxy)
        for _ in range(4 * RUNS):
            conn.execute(WRITE)
            assert conn.execute(READ).fetchall() == [("one",)]
        moved = delta(before, outcomes(proxy))
    looked_up = moved.get("hits", 0) + moved.get("misses", 0)
    # 1 in 4 at first (admission_explore_every), half as often after each declined exploration, down to 1 in 64.
    assert 1 <= looked_up <= 4 * RUNS // 16, moved


def test_an_exploration_that_hits_brings_the_explorations_back_to_their_first_rate(declining_proxy):
    proxy, dbname = declining_proxy
    with connect(proxy, dbname) as conn:
        settled(proxy, lambda: (conn.execute(WRITE), conn.execute(READ).fetchall()))
        for _ in range(4 * RUNS):     # explorations stretched to 1 in 64
            conn.execute(WRITE)
            conn.execute(READ).fetchall()
        before = outcomes(proxy)
        for _ in range(4 * RUNS):     # the writes stop: each exploration finds the previous one's entry
            assert conn.execute(READ).fetchall() == [("one",)]
        moved = delta(before, outcomes(proxy))
    # The first exploration (within 64) misses and stores; the next (64 later) hits, and from then on they come
    # 1 in 4 again, each a hit (this fixture's bar declines every fill, so the lookups themselves never resume).
    assert moved.get("hits", 0) >= (4 * RUNS - 2 * 64) // 4 - 2, moved
