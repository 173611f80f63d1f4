"""Statements whose answer can change without a write are never served from the cache, and settings that
change a result's text (search_path, TimeZone) give the same statement text separate, correct entries."""
from __future__ import annotations

import time

import psycopg.types.string
import pytest

from tests.cache_e2e.conftest import cache_stats, connect, hits, until_hit

REPEAT = 5
PAUSE = 0.2     # seconds between repetitions: time for the background analysis and the fill to land


@pytest.fixture(scope="module")
def schema(pg, module_db):
    pg.psql("""
        CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
        INSERT INTO items VALUES (1, 10), (2, 20);
        CREATE SEQUENCE seq;
        CREATE TABLE calls (n bigint NOT NULL); INSERT INTO calls VALUES (0);
        CREATE FUNCTION bump() RETURNS bigint VOLATILE LANGUAGE sql AS 'UPDATE calls SET n = n + 1 RETURNING n';
        CREATE FUNCTION item_value(int) RETURNS int VOLATILE LANGUAGE sql AS 'SELECT v FROM items WHERE id = $1';
        CREATE SCHEMA s1; CREATE SCHEMA s2;
        CREATE TABLE s1.t (v text); INSERT INTO s1.t VALUES ('one');
        CREATE TABLE s2.t (v text); INSERT INTO s2.t VALUES ('two');
        CREATE TABLE moments (ts timestamptz); INSERT INTO moments VALUES ('2024-01-01 12:00:00+00');
    """, dbname=module_db)
    return module_db


def repeated(proxy, conn, sql: str) -> tuple[list, int, dict]:
    """Run `sql` REPEAT times, pausing between runs: (answers, hits counted meanwhile, SHOW CACHE before)."""
    before = cache_stats(proxy)
    answers = []
    for _ in range(REPEAT):
        answers.append(conn.execute(sql).fetchall())
        time.sleep(PAUSE)
    return answers, hits(proxy) - int(before["hits"]), before


def refused(proxy, before: dict, reason: str) -> int:
    """How many more times the safety analysis refused a statement for `reason` than in `before`."""
    key = f"uncacheable:{reason}"
    return int(cache_stats(proxy).get(key, "0")) - int(before.get(key, "0"))


def test_a_plain_read_repeated_the_same_way_is_served_from_the_cache(module_proxy, schema):
    # The control for every test below: the same repetition does produce hits for a cacheable read.
    with connect(module_proxy, schema) as conn:
        answers, hit_count, _ = repeated(module_proxy, conn, "SELECT v FROM items WHERE id = 2")
    assert answers == [[(20,)]] * REPEAT
    assert hit_count >= 1


def test_now_is_never_cached(module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        answers, hit_count, before = repeated(module_proxy, conn, "SELECT now()")
    assert len({a[0][0] for a in answers}) == REPEAT     # each run is a new transaction with its own now()
    assert hit_count == 0 and refused(module_proxy, before, "volatile") >= REPEAT


def test_random_is_never_cached(module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        answers, hit_count, before = repeated(module_proxy, conn, "SELECT random()")
    assert len({a[0][0] for a in answers}) == REPEAT
    assert hit_count == 0 and refused(module_proxy, before, "volatile") >= REPEAT


def test_nextval_is_never_cached(module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        start = conn.execute("SELECT nextval('seq')").fetchone()[0]
        answers, hit_count, _ = repeated(module_proxy, conn, "SELECT nextval('seq')")
    assert [a[0][0] for a in answers] == [start + i for i in range(1, REPEAT + 1)]
    assert hit_count == 0


def test_current_user_is_never_cached(pg, module_proxy, schema):
    role = f"cu_{schema}"
    pg.psql(f"CREATE ROLE {role}")
    try:
        with connect(module_proxy, schema) as conn:
            as_postgres, hits_before_set, before = repeated(module_proxy, conn, "SELECT current_user")
            conn.execute(f"SET ROLE {role}")
            as_role, hits_after_set, _ = repeated(module_proxy, conn, "SELECT current_user")
            conn.execute("RESET ROLE")
    finally:
        pg.psql(f"DROP ROLE {role}")
    assert as_postgres == [[("postgres",)]] * REPEAT and as_role == [[(role,)]] * REPEAT
    assert hits_before_set == hits_after_set == 0
    assert refused(module_proxy, before, "volatile") >= 2 * REPEAT


def test_a_volatile_user_function_is_never_cached(pg, module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        answers, hit_count, before = repeated(module_proxy, conn, "SELECT bump()")
    first = answers[0][0][0]
    assert [a[0][0] for a in answers] == [first + i for i in range(REPEAT)]
    assert pg.psql("SELECT n FROM calls", dbname=schema).strip() == str(first + REPEAT - 1)
    assert hit_count == 0 and refused(module_proxy, before, "volatile") >= 1


def test_a_volatile_function_reading_a_table_sees_a_write_that_bypassed_the_proxy(pg, module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        first, hits_first, _ = repeated(module_proxy, conn, "SELECT item_value(1)")
        pg.psql("UPDATE items SET v = v + 1 WHERE id = 1", dbname=schema)
        after = conn.execute("SELECT item_value(1)").fetchone()[0]
        hits_after = hits(module_proxy)
        again = conn.execute("SELECT item_value(1)").fetchone()[0]
    assert first == [[(first[0][0][0],)]] * REPEAT and after == again == first[0][0][0] + 1
    assert hits_first == 0 and hits(module_proxy) == hits_after


def test_select_for_update_is_never_cached(pg, module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        answers, hit_count, before = repeated(module_proxy, conn, "SELECT v FROM items WHERE id = 2 FOR UPDATE")
        pg.psql("UPDATE items SET v = 21 WHERE id = 2", dbname=schema)
        after = conn.execute("SELECT v FROM items WHERE id = 2 FOR UPDATE").fetchall()
        pg.psql("UPDATE items SET v = 20 WHERE id = 2", dbname=schema)
    assert answers == [[(20,)]] * REPEAT and after == [(21,)]
    assert hit_count == 0 and refused(module_proxy, before, "locking") >= REPEAT


def test_search_path_gives_the_same_text_separate_entries(module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        read = lambda: conn.execute("SELECT v FROM t").fetchall()      # noqa: E731
        conn.execute("SET search_path TO s1")
        s1_hit = until_hit(module_proxy, read)
        conn.execute("SET search_path TO s2")
        s2_first = read()
        s2_hit = until_hit(module_proxy, read)
        conn.execute("SET search_path TO s1")
        before = hits(module_proxy)
        s1_again = read()
        s1_again_was_hit = hits(module_proxy) > before
    assert (s1_hit, s2_first, s2_hit, s1_again) == ([("one",)], [("two",)], [("two",)], [("one",)])
    assert s1_again_was_hit


def test_timezone_gives_the_same_text_separate_entries(module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        conn.adapters.register_loader("timestamptz", psycopg.types.string.TextLoader)   # the text Postgres sent
        read = lambda: conn.execute("SELECT ts FROM moments").fetchone()[0]     # noqa: E731
        conn.execute("SET TimeZone TO 'UTC'")
        utc = until_hit(module_proxy, read)
        conn.execute("SET TimeZone TO 'Asia/Tokyo'")
        tokyo_first = read()
        tokyo = until_hit(module_proxy, read)
        conn.execute("SET TimeZone TO 'UTC'")
        before = hits(module_proxy)
        utc_again = read()
        utc_again_was_hit = hits(module_proxy) > before
    assert (utc, tokyo_first, tokyo, utc_again) == (
        "2024-01-01 12:00:00+00", "2024-01-01 21:00:00+09", "2024-01-01 21:00:00+09", "2024-01-01 12:00:00+00")
    assert utc_again_was_hit


def test_reads_inside_an_explicit_transaction_go_to_postgres(module_proxy, schema):
    with connect(module_proxy, schema) as conn:
        read = lambda: conn.execute("SELECT v FROM items WHERE id = 2").fetchone()[0]      # noqa: E731
        cached = until_hit(module_proxy, read)
        before = hits(module_proxy)
        with conn.transaction():
            inside = [read() for _ in range(3)]
            conn.execute("UPDATE items SET v = 22 WHERE id = 2")
            own_write = read()
        hits_inside = hits(module_proxy) - before
        after_commit = read()
        conn.execute("UPDATE items SET v = 20 WHERE id = 2")
    assert (cached, inside, own_write, after_commit) == (20, [20, 20, 20], 22, 22)
    assert hits_inside == 0
