"""The extended protocol through the cache: psycopg 3 (prepared at once), asyncpg and pgbench -M prepared get
from hits what they get from Postgres, and a hit's bytes on the wire are a miss's bytes, for a simple Query
and for Parse/Bind/Describe/Execute/Sync (unnamed and named statements)."""
from __future__ import annotations

import asyncio
import re
import struct
import subprocess
import time

import asyncpg
import psycopg
import pytest

from tests.cache_e2e.conftest import cache_stats, connect, hits, until_hit
from tests.support.wire import RawConnection, message, query

INT4, TEXT = 23, 25
ROWS = 3
READ = "SELECT id, n, amount, label, at, blob, doc, tags, missing FROM kinds WHERE id = %s"


@pytest.fixture(scope="module")
def kinds(pg, module_db):
    """Rows of many types, so text and binary results of each are compared."""
    pg.psql(f"""
        CREATE TABLE kinds (id int PRIMARY KEY, n bigint, amount numeric(12, 3), label text, at timestamptz,
                            blob bytea, doc jsonb, tags int[], missing text);
        INSERT INTO kinds SELECT g, g::bigint * 1000000007, g * 1.5, 'label ' || g || ' é',
               timestamptz '2024-03-01 10:00:00+00' + g * interval '1 day 1 second', decode(repeat('ff00', g), 'hex'),
               jsonb_build_object('g', g, 'list', jsonb_build_array(1, 'two', null)), ARRAY[g, g + 1, NULL], NULL
        FROM generate_series(1, {ROWS}) g;
    """, dbname=module_db)
    return module_db


# ------------------------------------------------------------------------------------------- drivers

@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_prepared_statements_get_the_same_rows_from_hits_and_misses(pg, module_proxy, kinds, binary):
    with connect(module_proxy, kinds, prepare_threshold=0) as conn, \
            psycopg.connect(pg.dsn_for(kinds), autocommit=True) as direct:
        cur = conn.cursor(binary=binary)
        first = [cur.execute(READ, [i]).fetchall() for i in range(1, ROWS + 1)]
        from_hits = [until_hit(module_proxy, lambda i=i: cur.execute(READ, [i]).fetchall()) for i in range(1, ROWS + 1)]
        expected = [direct.cursor(binary=binary).execute(READ, [i]).fetchall() for i in range(1, ROWS + 1)]
    assert first == from_hits == expected
    assert [len(rows) for rows in expected] == [1] * ROWS


def asyncpg_rounds(pg, proxy, dbname: str, sql: str) -> tuple[list, list, int, list, dict]:
    """asyncpg reads sql for every row id, round after round until one whole round is answered from the cache
    (or 10 s passed): (first round, later rounds, hits in the last round, Postgres' answer, SHOW CACHE)."""
    async def fetch_all(conn) -> list:
        return [[tuple(r) for r in await conn.fetch(sql, i)] for i in range(1, ROWS + 1)]

    async def scenario():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres", database=dbname, timeout=10)
        direct = await asyncpg.connect(pg.dsn_for(dbname), timeout=10)
        try:
            first = await fetch_all(conn)
            deadline = time.monotonic() + 10
            rounds = []
            while True:
                before = hits(proxy)
                rounds.append(await fetch_all(conn))
                if hits(proxy) - before == ROWS or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            return first, rounds, hits(proxy) - before, await fetch_all(direct), cache_stats(proxy)
        finally:
            await conn.close()
            await direct.close()

    return asyncio.run(scenario())


def test_asyncpg_gets_the_same_records_from_hits_and_misses(pg, module_proxy, kinds):
    first, rounds, hit_round, expected, stats = asyncpg_rounds(
        pg, module_proxy, kinds, "SELECT id, n, amount, label, at, blob, doc, missing FROM kinds WHERE id = $1")
    assert hit_round == ROWS, f"asyncpg's reads were not all served from the cache: {stats}"
    assert first == expected and all(r == expected for r in rounds)


def test_asyncpg_reading_an_array_column_is_served_from_the_cache(pg, module_proxy, kinds):
    # asyncpg introspects the array type first, with set_config('jit', ...) among its queries.
    first, rounds, hit_round, expected, stats = asyncpg_rounds(
        pg, module_proxy, kinds, "SELECT id, tags FROM kinds WHERE id = $1")
    assert hit_round == ROWS, f"asyncpg's reads were not all served from the cache: {stats}"
    assert first == expected and all(r == expected for r in rounds)


def test_pgbench_prepared_selects_run_without_errors_and_hit(pg, module_proxy, kinds, tmp_path):
    script = tmp_path / "reads.sql"
    script.write_text(f"\\set id random(1, {ROWS})\n"
                      "SELECT id, n, amount, label, at, blob, doc, tags FROM kinds WHERE id = :id;\n"
                      "SELECT label FROM kinds WHERE id = :id;\n"
                      "SELECT count(*) FROM kinds WHERE n > :id;\n")
    before = hits(module_proxy)
    out = subprocess.run(
        [str(pg.bindir / "pgbench"), "-n", "-M", "prepared", "-f", str(script), "-c", "4", "-j", "2", "-t", "300",
         "-h", module_proxy.host, "-p", str(module_proxy.port), "-U", "postgres", kinds],
        capture_output=True, text=True, timeout=120)
    served = hits(module_proxy) - before
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert processed and int(processed.group(1)) == 1200, out.stdout
    assert failed and int(failed.group(1)) == 0, out.stdout
    assert "error" not in out.stderr.lower(), out.stderr
    assert served > 1000, f"only {served} of 3600 reads were hits"


# ------------------------------------------------------------------------------------------- bytes on the wire

def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def parse(name: str, sql: str, oids: list[int]) -> bytes:
    return message(b"P", cstr(name) + cstr(sql) + struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids))


def bind(statement: str, params: list[bytes], result_formats: list[int]) -> bytes:
    body = cstr("") + cstr(statement) + struct.pack("!hh", 1, 0) + struct.pack("!h", len(params))
    body += b"".join(struct.pack("!i", len(p)) + p for p in params)
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return message(b"B", body)


DESCRIBE_PORTAL = message(b"D", b"P" + cstr(""))
EXECUTE = message(b"E", cstr("") + struct.pack("!i", 0))
SYNC = message(b"S")


def exchange(conn: RawConnection, request: bytes) -> list[tuple[bytes, bytes]]:
    conn.send(request)
    return conn.read_until_ready()


def miss_and_hit(proxy, dbname: str, request: bytes, setup: bytes = b"") -> tuple[list, list]:
    """The answer to `request` from Postgres (its first sight) and the first answer counted as a cache hit."""
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.start("postgres", dbname)
        if setup:
            exchange(conn, setup)
        first = exchange(conn, request)
        hit = until_hit(proxy, lambda: exchange(conn, request))
    return first, hit


def direct_answer(pg, dbname: str, request: bytes, setup: bytes = b"") -> list:
    with RawConnection(pg.host, pg.port) as conn:
        conn.start("postgres", dbname)
        if setup:
            exchange(conn, setup)
        return exchange(conn, request)


def test_a_simple_query_hit_is_byte_identical_to_the_miss(pg, module_proxy, kinds):
    request = query("SELECT id, n, amount, label, at, blob, doc, tags, missing FROM kinds ORDER BY id")
    first, hit = miss_and_hit(module_proxy, kinds, request)
    assert [kind for kind, _ in first] == [b"T"] + [b"D"] * ROWS + [b"C", b"Z"]
    assert hit == first == direct_answer(pg, kinds, request)


@pytest.mark.parametrize("result_format", [0, 1], ids=["text", "binary"])
def test_an_unnamed_parse_bind_describe_execute_hit_is_byte_identical_to_the_miss(
        pg, module_proxy, kinds, result_format):
    request = (parse("", READ.replace("%s", "$1"), [INT4]) + bind("", [b"2"], [result_format]) + DESCRIBE_PORTAL
               + EXECUTE + SYNC)
    first, hit = miss_and_hit(module_proxy, kinds, request)
    assert [kind for kind, _ in first] == [b"1", b"2", b"T", b"D", b"C", b"Z"]
    assert hit == first == direct_answer(pg, kinds, request)


def test_a_named_statement_bind_execute_hit_is_byte_identical_to_the_miss(pg, module_proxy, kinds):
    setup = parse("by_id", READ.replace("%s", "$1"), [INT4]) + SYNC
    request = bind("by_id", [b"3"], [1]) + EXECUTE + SYNC         # no Describe: the client knows the columns
    first, hit = miss_and_hit(module_proxy, kinds, request, setup)
    assert [kind for kind, _ in first] == [b"2", b"D", b"C", b"Z"]
    assert hit == first == direct_answer(pg, kinds, request, setup)
