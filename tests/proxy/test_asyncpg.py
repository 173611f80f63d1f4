"""asyncpg through a transaction pool: prepared statements, cursors, COPY, transactions, a pool of 20 over 4."""
from __future__ import annotations

import asyncio

import asyncpg
import pytest

POOL_SIZE = 4


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=POOL_SIZE, timeouts={"query_wait": 10})


async def aconnect(proxy, dbname: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres", database=dbname, timeout=10)


def test_asyncpg_prepared_statement_is_reused_across_backends(proxy, module_db):
    async def scenario():
        conn = await aconnect(proxy, module_db)
        stmt = await conn.prepare("SELECT $1::int * 3, pg_backend_pid()")
        first_value, first_pid = await stmt.fetchrow(1)
        holders = []
        values, pids = [], []
        try:
            # Keep the first backend busy so the statement must run on another one.
            holder = await aconnect(proxy, module_db)
            holders.append(holder)
            while True:
                tx = holder.transaction()
                await tx.start()
                if await holder.fetchval("SELECT pg_backend_pid()") == first_pid:
                    break
                await tx.rollback()
                holder = await aconnect(proxy, module_db)
                holders.append(holder)
                assert len(holders) <= POOL_SIZE, "the first backend was never handed to another client"
            for i in range(20):
                value, pid = await stmt.fetchrow(i)
                values.append(value)
                pids.append(pid)
        finally:
            for h in holders:
                await h.close()
            await conn.close()
        return first_value, first_pid, values, pids

    first_value, first_pid, values, pids = asyncio.run(scenario())

    assert first_value == 3
    assert values == [i * 3 for i in range(20)]
    assert first_pid not in pids


def test_asyncpg_cursor_iterates_inside_a_transaction(proxy, module_db):
    async def scenario():
        conn = await aconnect(proxy, module_db)
        try:
            async with conn.transaction():
                numbers = [r[0] async for r in conn.cursor("SELECT generate_series(1, 10000)", prefetch=700)]
                cur = await conn.cursor("SELECT generate_series(1, 100)")
                await cur.forward(10)
                chunk = await cur.fetch(5)
        finally:
            await conn.close()
        return numbers, [r[0] for r in chunk]

    numbers, chunk = asyncio.run(scenario())

    assert numbers == list(range(1, 10001))
    assert chunk == [11, 12, 13, 14, 15]


def test_asyncpg_copy_records_to_table_loads_every_record(proxy, module_db, items):
    async def scenario():
        conn = await aconnect(proxy, module_db)
        try:
            result = await conn.copy_records_to_table("items", records=[(i, f"r{i}") for i in range(20_000)])
            rows = await conn.fetch("SELECT id, label FROM items ORDER BY id")
        finally:
            await conn.close()
        return result, [tuple(r) for r in rows]

    result, rows = asyncio.run(scenario())

    assert result == "COPY 20000"
    assert rows == [(i, f"r{i}") for i in range(20_000)]


def test_asyncpg_transactions_commit_roll_back_and_use_savepoints(proxy, module_db, items):
    async def scenario():
        conn = await aconnect(proxy, module_db)
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (1, 'outer')")
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with conn.transaction():
                        await conn.execute("INSERT INTO items VALUES (2, 'inner')")
                        await conn.execute("INSERT INTO items VALUES (1, 'duplicate')")
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO items VALUES (3, 'rolled back')")
                    raise RuntimeError("abandon")
            return [tuple(r) for r in await conn.fetch("SELECT id, label FROM items ORDER BY id")]
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == [(1, "outer")]


def test_asyncpg_pool_of_20_over_a_proxy_pool_of_4_runs_every_transaction(proxy, module_db, items):
    tasks = 400

    async def one(pool, i):
        async with pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES ($1, $2)", i, f"task {i}")
                return await conn.fetchval("SELECT label FROM items WHERE id = $1", i)

    async def scenario():
        async with asyncpg.create_pool(host=proxy.host, port=proxy.port, user="postgres", database=module_db,
                                       min_size=20, max_size=20) as pool:
            labels = await asyncio.gather(*(one(pool, i) for i in range(tasks)))
            count = await pool.fetchval("SELECT count(*) FROM items")
        return labels, count

    labels, count = asyncio.run(scenario())

    assert labels == [f"task {i}" for i in range(tasks)]
    assert count == tasks


def test_asyncpg_query_timeout_cancels_the_query_and_the_connection_stays_usable(proxy, module_db):
    async def scenario():
        conn = await aconnect(proxy, module_db)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(10)", timeout=0.5)
            return await conn.fetchval("SELECT 'usable'")
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == "usable"


def test_asyncpg_without_statement_cache_gets_right_answers_under_contention(proxy, module_db):
    # statement_cache_size=0 is how asyncpg is usually set up behind PgBouncer: unnamed statements,
    # described in one round trip and executed in the next.
    async def client(n):
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres", database=module_db,
                                     statement_cache_size=0, timeout=10)
        try:
            return [await conn.fetchval(f"SELECT $1::int * {n}", i) for i in range(50)]
        finally:
            await conn.close()

    async def scenario():
        return await asyncio.gather(*(client(n) for n in range(1, 9)))

    results = asyncio.run(scenario())

    assert results == [[i * n for i in range(50)] for n in range(1, 9)]
