"""lookup / fill / invalidate against real Postgres and Redis: hits, writes through the proxy, writes that
bypass it (logical decoding), DDL, several instances sharing Redis, and what stop() leaves behind."""
from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.cache.conftest import context, eventually, settled, started

READ = b"SELECT id, name FROM items WHERE id = 1"
WRITE = b"UPDATE items SET name = 'z' WHERE id = 1"


@pytest.fixture
def db(pg, fresh_db):
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a'), (2, 'b');"
            "CREATE TABLE other (id int)", dbname=fresh_db)
    return fresh_db


async def fill_once(cache, ctx, sql=READ, payload=b"rows"):
    """A miss, then the result offered as Postgres' answer; (key, verdict)."""
    v = await settled(cache, sql, ctx)
    assert v.cacheable, v
    key = cache.key(ctx, sql)
    entry, token = await cache.lookup(key, v.tables)
    assert entry is None and token is not None
    cache.fill(key, v.tables, token, payload, exec_us=5000, template="items-by-id")
    return key, v


async def stored(cache, key, v) -> bytes | None:
    """The entry as another lookup sees it from Redis (the in-process copy set aside)."""
    cache.l1.drop(key)
    return (await cache.lookup(key, v.tables))[0]


def test_a_filled_result_is_served_until_its_table_is_written(make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            from_l1 = (await cache.lookup(key, v.tables))[0]
            from_redis = await eventually(lambda: stored(cache, key, v))
            assert await cache.invalidate(cache.writes(WRITE, ctx)) is True
            after_write = (await cache.lookup(key, v.tables))[0]
            return from_l1, from_redis, after_write, cache.stats()
        finally:
            await cache.stop()
    from_l1, from_redis, after_write, stats = asyncio.run(body())
    assert (from_l1, from_redis, after_write) == (b"rows", b"rows", None)
    assert stats["hits"] == 2 and stats["hits_l1"] == 1 and stats["invalidations"] >= 1


def test_a_write_to_another_table_keeps_the_entry(make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            await cache.invalidate(cache.writes(b"INSERT INTO other VALUES (1)", ctx))
            return await eventually(lambda: stored(cache, key, v))
        finally:
            await cache.stop()
    assert asyncio.run(body()) == b"rows"


def test_a_fill_racing_a_write_is_born_unreachable(make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            v = await settled(cache, READ, ctx)
            key = cache.key(ctx, READ)
            _, token = await cache.lookup(key, v.tables)     # generations read before "running" the query
            assert await cache.invalidate(cache.writes(WRITE, ctx))   # a write lands while it runs
            cache.fill(key, v.tables, token, b"stale rows", exec_us=5000, template="items-by-id")
            await asyncio.sleep(0.1)                          # let the background store happen
            in_process = (await cache.lookup(key, v.tables))[0]
            return in_process, await stored(cache, key, v), cache.stats()["fills"]
        finally:
            await cache.stop()
    in_process, in_redis, fills = asyncio.run(body())
    assert fills == 1 and in_process is None and in_redis is None


def test_an_invalidation_on_one_instance_makes_another_instances_l1_miss(make_cache, db, redis_server):
    async def body():
        a = make_cache(dbname=db)
        b = make_cache(dbname=db, key_prefix=a.cfg.key_prefix)
        await started(a)
        await started(b)
        try:
            ctx = context(db)
            key, v = await fill_once(a, ctx)
            vb = await settled(b, READ, ctx)
            served_by_b = await eventually(lambda: b.lookup(key, vb.tables))
            in_b_l1 = b.l1.get(key) is not None
            assert await a.invalidate(a.writes(WRITE, ctx))
            after = (await b.lookup(key, vb.tables))[0]
            return served_by_b[0], in_b_l1, after
        finally:
            await a.stop()
            await b.stop()
    served, in_l1, after = asyncio.run(body())
    assert (served, in_l1, after) == (b"rows", True, None)


def test_pub_sub_drops_other_instances_l1_copies(make_cache, db):
    async def body():
        a = make_cache(dbname=db)
        b = make_cache(dbname=db, key_prefix=a.cfg.key_prefix)
        await started(a)
        await started(b)
        try:
            ctx = context(db)
            key, v = await fill_once(a, ctx)
            vb = await settled(b, READ, ctx)
            await eventually(lambda: b.lookup(key, vb.tables))
            assert b.l1.get(key) is not None
            await a.invalidate(a.writes(WRITE, ctx))
            return await eventually(lambda: b.l1.get(key) is None)
        finally:
            await a.stop()
            await b.stop()
    assert asyncio.run(body()) is True


@pytest.mark.parametrize("decoding", ["stream", "poll"])
def test_a_write_that_bypasses_the_proxy_invalidates_through_logical_decoding(pg, make_cache, db, decoding):
    async def body():
        cache = await started(make_cache(dbname=db, decoding=decoding))
        direct = await asyncpg.connect(pg.dsn_for(db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            before = await eventually(lambda: stored(cache, key, v))
            await direct.execute("UPDATE items SET name = 'elsewhere' WHERE id = 2")
            gone = await eventually(lambda: _missing(cache, key, v))
            return before, gone, cache.stats()
        finally:
            await direct.close()
            await cache.stop()
    before, gone, stats = asyncio.run(body())
    assert before == b"rows" and gone
    assert stats["decoded_invalidations"] >= 1
    lag = stats["databases"][db]["decoding"]["lag"]
    assert lag["batches"] >= 1 and lag["max_seconds"] > 0 and stats["decoding_lag_seconds"] > 0


async def _missing(cache, key, v) -> bool:
    entry, token = await cache.lookup(key, v.tables)
    return entry is None and token is not None


def test_a_trigger_write_bypassing_the_proxy_is_seen_too(pg, make_cache, db):
    pg.psql("""CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN UPDATE items SET name = name || '!' WHERE id = 1; RETURN NEW; END $$;
               CREATE TRIGGER touch AFTER INSERT ON other FOR EACH ROW EXECUTE FUNCTION touch()""", dbname=db)

    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            await eventually(lambda: stored(cache, key, v))
            pg.psql("INSERT INTO other VALUES (7)", dbname=db)
            return await eventually(lambda: _missing(cache, key, v))
        finally:
            await cache.stop()
    assert asyncio.run(body()) is True


def test_ddl_that_bypasses_the_proxy_flushes_and_forgets_verdicts(pg, make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx, sql=b"SELECT * FROM items")
            await eventually(lambda: stored(cache, key, v))
            version = cache.catalog_version
            pg.psql("ALTER TABLE items ADD COLUMN extra int", dbname=db)   # SELECT * now returns other bytes
            changed = await eventually(lambda: cache.catalog_version > version)
            old_verdict_refused = (await cache.lookup(key, v.tables)) == (None, None)
            v2 = await settled(cache, b"SELECT * FROM items", ctx)
            entry, token = await cache.lookup(key, v2.tables)
            return changed, old_verdict_refused, v2.cacheable, entry, token is not None
        finally:
            await cache.stop()
    assert asyncio.run(body()) == (True, True, True, None, True)


def test_ddl_through_the_proxy_forgets_verdicts_before_the_client_hears_back(make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            ok = await cache.invalidate(cache.writes(b"ALTER TABLE items ENABLE ROW LEVEL SECURITY", ctx))
            refused = await cache.lookup(key, v.tables)
            pending = cache.classify(READ, ctx).reason
            return ok, refused, pending
        finally:
            await cache.stop()
    assert asyncio.run(body()) == (True, (None, None), "pending")


@pytest.mark.parametrize("decoding", ["stream", "poll"])
def test_stop_leaves_no_replication_slot_behind(pg, make_cache, db, decoding):
    async def body():
        cache = await started(make_cache(dbname=db, decoding=decoding))
        slot = cache.stats()["databases"][db]["decoding"]["slot"]
        await cache.stop()
        return slot
    slot = asyncio.run(body())
    assert slot and slot.startswith("pgpilot_")
    assert pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgpilot\\_%'").strip() == "0"


def test_a_lost_decoding_slot_stops_serving_then_a_new_slot_serves_without_old_entries(pg, make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            await eventually(lambda: stored(cache, key, v))
            first_slot = cache.stats()["databases"][db]["decoding"]["slot"]
            pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pgpilot-cache-decoding'", dbname=db)
            stopped = await eventually(lambda: not cache.serving)
            resumed = await eventually(lambda: cache.serving
                                       and cache.stats()["databases"][db]["decoding"]["slot"] not in (None, first_slot))
            entry, token = await cache.lookup(key, v.tables)
            return stopped, resumed, entry, token is not None
        finally:
            await cache.stop()
    assert asyncio.run(body()) == (True, True, None, True)


def test_without_redis_one_process_keeps_generations_itself(pg, make_cache, db):
    async def body():
        cache = await started(make_cache(redis_url=None, dbname=db))
        try:
            ctx = context(db)
            key, v = await fill_once(cache, ctx)
            hit = (await cache.lookup(key, v.tables))[0]
            await cache.invalidate(cache.writes(WRITE, ctx))
            after_write = (await cache.lookup(key, v.tables))[0]
            key, v = await fill_once(cache, ctx, payload=b"again")
            pg.psql("UPDATE items SET name = 'bypass' WHERE id = 2", dbname=db)
            after_bypass = await eventually(lambda: _missing(cache, key, v))
            return hit, after_write, after_bypass
        finally:
            await cache.stop()
    assert asyncio.run(body()) == (b"rows", None, True)
