"""psycopg 3 and psycopg2 through a transaction pool: prepared statements, pipelines, COPY, cursors, batches."""
from __future__ import annotations

import threading

import psycopg
import psycopg2
import psycopg2.extras
import pytest

from tests.proxy.helpers import connect, holding_backend

POOL_SIZE = 2


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=POOL_SIZE, timeouts={"query_wait": 5})


def test_psycopg_prepared_statements_are_re_prepared_on_another_backend(proxy, module_db):
    with connect(proxy, module_db, prepare_threshold=0) as conn:
        first = conn.execute("SELECT %s::int * 2, pg_backend_pid()", [21]).fetchone()
        with holding_backend(proxy, module_db, first[1], POOL_SIZE) as holder:
            assert holder is not None, "the released backend was never handed to another client"
            again = conn.execute("SELECT %s::int * 2, pg_backend_pid()", [50]).fetchone()
            other = conn.execute("SELECT %s::text || '!', pg_backend_pid()", ["hi"]).fetchone()
        after = [conn.execute("SELECT %s::int * 2, pg_backend_pid()", [i]).fetchone()[0] for i in range(20)]

    assert first[0] == 42
    assert again[0] == 100 and again[1] != first[1]
    assert other[0] == "hi!"
    assert after == [i * 2 for i in range(20)]


def test_psycopg_prepared_statements_of_two_clients_do_not_collide(proxy, module_db):
    # Both clients name their first prepared statement _pg3_0, with different texts.
    with connect(proxy, module_db, prepare_threshold=0) as a, connect(proxy, module_db, prepare_threshold=0) as b:
        results = []
        for i in range(30):
            results.append(a.execute("SELECT %s::int + 1000", [i]).fetchone()[0])
            results.append(b.execute("SELECT 'b-' || %s::text", [i]).fetchone()[0])

    assert results == [x for i in range(30) for x in (i + 1000, f"b-{i}")]


def test_psycopg_pipeline_returns_every_result_in_order(proxy, module_db, items):
    with connect(proxy, module_db, prepare_threshold=0) as conn:
        with conn.pipeline():
            for i in range(100):
                conn.execute("INSERT INTO items VALUES (%s, %s)", [i, f"item {i}"])
            cursors = [conn.execute("SELECT label FROM items WHERE id = %s", [i]) for i in range(100)]
        labels = [cur.fetchone()[0] for cur in cursors]

    assert labels == [f"item {i}" for i in range(100)]


def test_psycopg_pipeline_error_aborts_its_batch_and_the_connection_recovers(proxy, module_db, items):
    with connect(proxy, module_db) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline(), conn.transaction():
                conn.execute("INSERT INTO items VALUES (1, 'one')")
                conn.execute("INSERT INTO items VALUES (1, 'duplicate')")
                conn.execute("INSERT INTO items VALUES (2, 'two')")
        count = conn.execute("SELECT count(*) FROM items").fetchone()[0]

    assert count == 0


def test_psycopg_copy_round_trips_rows(proxy, module_db, items):
    rows = [(i, f"label {i}\twith tab") for i in range(20_000)]
    with connect(proxy, module_db) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY items (id, label) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            with cur.copy("COPY (SELECT id, label FROM items ORDER BY id) TO STDOUT") as copy:
                copied = [(int(i), label) for i, label in copy.rows()]

    assert copied == rows


def test_psycopg_copy_aborted_by_the_client_loads_nothing(proxy, module_db, items):
    with connect(proxy, module_db) as conn:
        with pytest.raises(RuntimeError):  # psycopg sends CopyFail and re-raises
            with conn.cursor() as cur, cur.copy("COPY items (id, label) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, "doomed"))
                raise RuntimeError("the client gives up mid-COPY")
        count = conn.execute("SELECT count(*) FROM items").fetchone()[0]

    assert count == 0


def test_psycopg_named_cursor_streams_rows_inside_a_transaction(proxy, module_db):
    stop = threading.Event()
    errors: list[Exception] = []

    def neighbour():
        try:
            with connect(proxy, module_db) as other:
                while not stop.is_set():
                    other.execute("SELECT 1")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=neighbour) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with connect(proxy, module_db, autocommit=False) as conn:
            with conn.cursor(name="numbers") as cur:
                cur.itersize = 500
                cur.execute("SELECT n, pg_backend_pid() FROM generate_series(1, 20000) AS n")
                rows = list(cur)
            conn.commit()
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert [n for n, _ in rows] == list(range(1, 20001))
    assert len({pid for _, pid in rows}) == 1
    assert errors == []


def test_psycopg_executemany_inserts_every_row(proxy, module_db, items):
    with connect(proxy, module_db) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s)", [(i, f"item {i}") for i in range(2000)])
        count, total = conn.execute("SELECT count(*), sum(id) FROM items").fetchone()

    assert (count, total) == (2000, sum(range(2000)))


def test_psycopg_rolled_back_transaction_leaves_no_rows(proxy, module_db, items):
    with connect(proxy, module_db, autocommit=False) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'one')")
        conn.rollback()
        conn.execute("INSERT INTO items VALUES (2, 'two')")
        conn.commit()
        ids = [r[0] for r in conn.execute("SELECT id FROM items")]

    assert ids == [2]


def psycopg2_connect(proxy, dbname):
    return psycopg2.connect(host=proxy.host, port=proxy.port, user="postgres", dbname=dbname, connect_timeout=10)


def test_psycopg2_commits_and_rolls_back(proxy, module_db, items):
    conn = psycopg2_connect(proxy, module_db)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (%s, %s)", (1, "kept"))
            conn.commit()
            cur.execute("INSERT INTO items VALUES (%s, %s)", (2, "discarded"))
            conn.rollback()
            cur.execute("SELECT id, label FROM items")
            rows = cur.fetchall()
    finally:
        conn.close()

    assert rows == [(1, "kept")]


def test_psycopg2_error_then_query_on_same_connection(proxy, module_db):
    conn = psycopg2_connect(proxy, module_db)
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.DivisionByZero):
                cur.execute("SELECT 1/0")
            conn.rollback()
            cur.execute("SELECT %s || %s", ("still ", "here"))
            value = cur.fetchone()[0]
    finally:
        conn.close()

    assert value == "still here"


def test_psycopg2_named_cursor_fetches_in_batches(proxy, module_db):
    conn = psycopg2_connect(proxy, module_db)
    try:
        with conn.cursor(name="numbers") as cur:
            cur.itersize = 1000
            cur.execute("SELECT n FROM generate_series(1, 10000) AS n")
            numbers = [n for (n,) in cur]
        conn.commit()
    finally:
        conn.close()

    assert numbers == list(range(1, 10001))


def test_psycopg2_copy_expert_and_execute_values_round_trip(proxy, module_db, items, tmp_path):
    import io

    conn = psycopg2_connect(proxy, module_db)
    try:
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, "INSERT INTO items VALUES %s",
                                           [(i, f"v{i}") for i in range(5000)], page_size=500)
            conn.commit()
            out = io.StringIO()
            cur.copy_expert("COPY (SELECT id, label FROM items ORDER BY id) TO STDOUT", out)
            cur.execute("TRUNCATE items")
            cur.copy_expert("COPY items FROM STDIN", io.StringIO(out.getvalue()))
            conn.commit()
            cur.execute("SELECT count(*), sum(id) FROM items")
            count, total = cur.fetchone()
    finally:
        conn.close()

    assert out.getvalue() == "".join(f"{i}\tv{i}\n" for i in range(5000))
    assert (count, total) == (5000, sum(range(5000)))
