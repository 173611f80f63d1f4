"""A thousand concurrent clients share a pool of 20 backends and every one gets its own answer."""
from __future__ import annotations

import asyncio
import resource

import asyncpg
import psycopg
import pytest

CLIENTS = 1000
POOL_SIZE = 20


def allow_open_files(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard) if hard != resource.RLIM_INFINITY else n, hard))


@pytest.mark.timeout(180)
def test_thousand_concurrent_clients_over_a_pool_of_20_all_get_their_answer(fresh_db, pg, proxy_factory):
    allow_open_files(4 * CLIENTS)  # the proxy inherits the limit: a client socket and a spare per client
    proxy = proxy_factory(dbname=fresh_db, pool_size=POOL_SIZE, max_client_conn=CLIENTS + 200,
                          timeouts={"query_wait": 60})

    async def scenario():
        sem = asyncio.Semaphore(200)  # connect in waves so the listen backlog never overflows

        async def open_one(i: int) -> asyncpg.Connection:
            async with sem:
                return await asyncpg.connect(host=proxy.host, port=proxy.port, user=f"client{i}",
                                             database=fresh_db, timeout=60)

        opened: list[asyncpg.Connection] = []
        try:
            for conn in await asyncio.gather(*(open_one(i) for i in range(CLIENTS))):
                opened.append(conn)
            answers = await asyncio.gather(*(
                conn.fetchval("SELECT $1::int FROM pg_sleep(0.01)", i) for i, conn in enumerate(opened)))
            with psycopg.connect(pg.dsn_for(fresh_db)) as direct:
                backends = direct.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    [fresh_db]).fetchone()[0]
        finally:
            await asyncio.gather(*(conn.close(timeout=30) for conn in opened), return_exceptions=True)
        return len(opened), answers, backends

    connected, answers, backends = asyncio.run(scenario())

    assert connected == CLIENTS
    assert answers == list(range(CLIENTS))
    assert backends <= POOL_SIZE
    assert proxy.alive()
