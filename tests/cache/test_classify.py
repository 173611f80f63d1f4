"""classify() and writes() against a real database: what may be answered from the cache, which generation keys a
statement reads, and which it writes."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from proxy.cache import CATALOG, FLUSH
from tests.cache.conftest import context, settled, started

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);
INSERT INTO items VALUES (1, 'a', 1.5), (2, 'b', 2.5);
CREATE SEQUENCE s;
CREATE FUNCTION vol(int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1';
CREATE FUNCTION stab(int) RETURNS int LANGUAGE sql STABLE AS 'SELECT $1';
CREATE FUNCTION imm(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2';
CREATE FUNCTION secdef(int) RETURNS int LANGUAGE sql IMMUTABLE SECURITY DEFINER AS 'SELECT $1';
CREATE TABLE guarded (id int, owner text);
ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
CREATE UNLOGGED TABLE scratch (id int);
CREATE VIEW item_names AS SELECT id, name FROM items;
CREATE VIEW item_clock AS SELECT id, now() AS at FROM items;
CREATE TABLE events (id int, day date) PARTITION BY RANGE (day);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE base (id int);
CREATE TABLE derived (extra int) INHERITS (base);
CREATE SCHEMA app;
CREATE TABLE app.items (id int, label text);
"""


@pytest.fixture
def db(pg, fresh_db):
    pg.psql(SCHEMA, dbname=fresh_db)
    return fresh_db


def classify_all(make_cache, db, sqls, **ctx_settings):
    """Start a cache on `db`, settle the verdict of each text, stop; {sql: Verdict}."""
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db, **ctx_settings)
            return {sql: await settled(cache, sql, ctx) for sql in sqls}
        finally:
            await cache.stop()
    return asyncio.run(body())


NEVER_CACHEABLE = [
    ("SELECT now(), name FROM items", "volatile"),
    ("SELECT random() FROM items", "volatile"),
    ("SELECT nextval('s')", "volatile"),
    ("SELECT current_user, name FROM items", "volatile"),
    ("SELECT vol(id) FROM items", "volatile"),
    ("SELECT stab(id) FROM items", "volatile"),
    ("SELECT to_char(price, '999D9') FROM items", "volatile"),
    ("SELECT * FROM item_clock", "volatile"),
    ("SELECT * FROM items WHERE name <> 'now'::timestamptz::text", "volatile"),
    ("SELECT * FROM items FOR UPDATE", "locking"),
    ("SELECT relname FROM pg_class", "system_catalog"),
    ("SELECT table_name FROM information_schema.tables", "system_catalog"),
    ("SELECT * FROM guarded", "rls"),
    ("SELECT secdef(id) FROM items", "security_definer"),
    ("SELECT * FROM scratch", "unlogged"),
    ("SELECT last_value FROM s", "sequence"),
    ("SELECT 'items'::regclass", "catalog_type"),
    ("SELECT * FROM no_such_table", "analysis_error"),
]


def test_statements_that_are_never_answered_from_the_cache(make_cache, db):
    verdicts = classify_all(make_cache, db, [sql for sql, _ in NEVER_CACHEABLE])
    got = {sql: (v.cacheable, v.reason) for sql, v in verdicts.items()}
    assert got == {sql: (False, reason) for sql, reason in NEVER_CACHEABLE}


def test_plain_reads_with_immutable_functions_are_cacheable_and_name_the_tables_they_read(make_cache, db):
    sqls = ["SELECT id, name FROM items WHERE id = 1",
            "SELECT imm(id), lower(name), price * 2, count(*) OVER () FROM items ORDER BY 1",
            "SELECT count(*) FROM items WHERE id = $1 AND name = $2",
            "SELECT i.name FROM items i JOIN app.items a ON a.id = i.id",
            "SELECT 1 + 1"]
    verdicts = classify_all(make_cache, db, sqls)
    assert [(v.cacheable, tuple(v.tables)) for v in verdicts.values()] == [
        (True, (f"{db}/public.items",)),
        (True, (f"{db}/public.items",)),
        (True, (f"{db}/public.items",)),
        (True, (f"{db}/app.items", f"{db}/public.items")),
        (True, ()),
    ]


def test_a_view_is_keyed_by_the_tables_it_reads(make_cache, db):
    v = classify_all(make_cache, db, ["SELECT * FROM item_names"])["SELECT * FROM item_names"]
    assert v.cacheable and tuple(v.tables) == (f"{db}/public.items",)


def test_partitions_and_inheritance_children_share_their_roots_key(make_cache, db):
    verdicts = classify_all(make_cache, db, ["SELECT * FROM events", "SELECT * FROM events_2024",
                                             "SELECT * FROM base", "SELECT * FROM derived"])
    assert [tuple(v.tables) for v in verdicts.values()] == [
        (f"{db}/public.events",), (f"{db}/public.events",), (f"{db}/public.base",), (f"{db}/public.base",)]


def test_names_resolve_through_the_sessions_search_path(make_cache, db):
    in_app = classify_all(make_cache, db, ["SELECT id FROM items"], search_path="app, public")
    assert tuple(in_app["SELECT id FROM items"].tables) == (f"{db}/app.items",)


@pytest.fixture
def view_reader(pg, db):
    """A role that may read the view item_names but not the table items behind it."""
    role = "reader_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE ROLE {role}; GRANT SELECT ON item_names TO {role}", dbname=db)
    yield role
    pg.psql(f"DROP OWNED BY {role}; DROP ROLE {role}", dbname=db, check=False)


def test_a_view_reading_what_the_role_could_not_read_itself_is_not_cacheable(make_cache, db, view_reader):
    sql = "SELECT * FROM item_names"
    v = classify_all(make_cache, db, [sql], search_path="public")
    assert v[sql].cacheable
    as_reader = asyncio.run(_classify_as(make_cache, db, sql, view_reader))
    assert (as_reader.cacheable, as_reader.reason) == (False, "view_privilege")


async def _classify_as(make_cache, db, sql, role):
    cache = await started(make_cache(dbname=db))
    try:
        return await settled(cache, sql, context(db, role=role))
    finally:
        await cache.stop()


def test_temporary_tables_are_not_cacheable(pg, make_cache, db):
    async def body():
        owner = await asyncpg.connect(pg.dsn_for(db))
        try:
            await owner.execute("CREATE TEMP TABLE mine (id int)")
            schema = await owner.fetchval("SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()")
            cache = await started(make_cache(dbname=db))
            try:
                ctx = context(db)
                qualified = await settled(cache, f"SELECT * FROM {schema}.mine", ctx)
                unqualified = await settled(cache, "SELECT * FROM mine", ctx)   # invisible outside its session
            finally:
                await cache.stop()
        finally:
            await owner.close()
        return qualified, unqualified
    qualified, unqualified = asyncio.run(body())
    assert (qualified.cacheable, qualified.reason) == (False, "temp_table")
    assert not unqualified.cacheable


def test_write_targets(make_cache, db):
    statements = {
        "UPDATE items SET name = 'x' WHERE id = 1": (f"{db}/public.items",),
        "INSERT INTO events_2024 VALUES (1, '2024-02-02')": (f"{db}/public.events",),
        "DELETE FROM derived": (f"{db}/public.base",),
        "WITH gone AS (DELETE FROM items RETURNING *) INSERT INTO app.items SELECT id, name FROM gone":
            (f"{db}/public.items", f"{db}/app.items"),
        "COPY items FROM STDIN": (f"{db}/public.items",),
        "TRUNCATE items": (f"{db}/public.items",),
        "SELECT * FROM items": (),
        "COPY items TO STDOUT": (),
        "SELECT vol(1)": (FLUSH,),
        "INSERT INTO no_such_table VALUES (1)": (FLUSH,),
        "INSERT INTO item_names VALUES (3, 'c')": (FLUSH,),
        "CALL some_procedure()": (FLUSH,),
        "ALTER TABLE items ADD COLUMN z int": (FLUSH, CATALOG),
        "TRUNCATE items CASCADE": (FLUSH, CATALOG),
        "GRANT SELECT ON items TO PUBLIC": (FLUSH, CATALOG),
    }

    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            return {sql: cache.writes(sql.encode(), ctx) for sql in statements}
        finally:
            await cache.stop()
    got = asyncio.run(body())
    assert {sql: tuple(sorted(w)) for sql, w in got.items()} == {
        sql: tuple(sorted(w)) for sql, w in statements.items()}


def test_texts_differing_only_in_constants_are_analysed_once_for_their_writes(make_cache, db):
    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db)
            before = cache.stats()["write_analyses"]
            got = {cache.writes(b"UPDATE items SET name = 'n%d', price = %d.5 WHERE id = %d" % (i, i, i), ctx)
                   for i in range(20)}
            return got, cache.stats()["write_analyses"] - before
        finally:
            await cache.stop()
    assert asyncio.run(body()) == ({(f"{db}/public.items",)}, 1)


def test_a_shape_is_analysed_again_for_its_writes_after_the_catalog_changes(pg, make_cache, db):
    """A table created earlier on the search path takes the name over: texts of a shape seen before must resolve
    to it, not to what the shape wrote before the DDL."""
    pg.psql("CREATE TABLE public.gadgets (id int)", dbname=db)

    async def body():
        cache = await started(make_cache(dbname=db))
        try:
            ctx = context(db, search_path="app, public")
            first = cache.writes(b"UPDATE gadgets SET id = 1", ctx)
            ddl = b"CREATE TABLE app.gadgets (id int)"
            conn = await asyncpg.connect(pg.dsn_for(db))
            try:
                await conn.execute(ddl.decode())
            finally:
                await conn.close()
            assert await cache.invalidate(cache.writes(ddl, ctx))
            deadline = asyncio.get_running_loop().time() + 15
            while True:       # (FLUSH,) while the catalog snapshot is being read again
                after = cache.writes(b"UPDATE gadgets SET id = 2", ctx)
                if after != (FLUSH,) or asyncio.get_running_loop().time() > deadline:
                    return first, after
                await asyncio.sleep(0.05)
        finally:
            await cache.stop()
    assert asyncio.run(body()) == ((f"{db}/public.gadgets",), (f"{db}/app.gadgets",))
