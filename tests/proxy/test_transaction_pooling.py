"""Transaction pooling semantics seen by one client: what stays on one backend, and what the protocol guarantees."""
from __future__ import annotations

import hashlib
import os
import struct
import threading

import psycopg
import pytest

from tests.proxy.helpers import backend_pid, connect, holding_backend
from tests.support.wire import RawConnection, message, query

POOL_SIZE = 2


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=POOL_SIZE, timeouts={"query_wait": 5})


class Neighbours:
    """Other clients looping short transactions, competing for the pool; they record any error they see."""

    def __init__(self, proxy, dbname: str, count: int = 2):
        self.proxy, self.dbname = proxy, dbname
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]

    def _loop(self) -> None:
        try:
            with connect(self.proxy, self.dbname, prepare_threshold=None) as conn:
                while not self.stop.is_set():
                    conn.execute("SELECT count(*) FROM pg_class")
        except psycopg.Error as e:
            self.errors.append(f"{type(e).__name__}: {e}")

    def __enter__(self) -> "Neighbours":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_transaction_keeps_one_backend_until_commit(proxy, module_db):
    with Neighbours(proxy, module_db) as neighbours, connect(proxy, module_db, autocommit=False) as client:
        seen = {client.execute("SELECT pg_backend_pid(), txid_current()").fetchone() for _ in range(30)}
        client.commit()

    assert len(seen) == 1
    assert neighbours.errors == []


def test_failed_transaction_keeps_its_backend_until_rollback(proxy, module_db, pg):
    pg.psql("CREATE TABLE t (x int)", dbname=module_db)
    with Neighbours(proxy, module_db) as neighbours, connect(proxy, module_db, autocommit=False) as client:
        client.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            client.execute("SELECT 1/0")
        for _ in range(20):
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                client.execute("SELECT 1")
        client.rollback()
        after = client.execute("SELECT count(*) FROM t").fetchone()[0]
        client.commit()

    assert after == 0
    assert neighbours.errors == []


def test_deallocate_all_forgets_the_clients_prepared_statements(proxy, module_db):
    with connect(proxy, module_db, prepare_threshold=0) as client:
        first = client.execute("SELECT %s::int + 1", [1]).fetchone()[0]
        client.execute("DEALLOCATE ALL")
        again = client.execute("SELECT %s::int + 1", [2]).fetchone()[0]
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE):
            elsewhere = client.execute("SELECT %s::int + 1", [3]).fetchone()[0]

    assert (first, again, elsewhere) == (2, 3, 4)


def test_statement_name_closed_and_parsed_again_runs_the_new_text(proxy, module_db):
    parse = lambda sql: message(b"P", b"s1\0" + sql + b"\0\0\0")  # noqa: E731
    bind_execute = message(b"B", b"\0s1\0\0\0\0\0\0\0") + message(b"E", b"\0\0\0\0\0")
    sync = message(b"S")
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.start("postgres", module_db)
        conn.send(parse(b"SELECT 'first'") + bind_execute + sync)
        first = conn.read_until_ready()
        conn.send(message(b"C", b"Ss1\0") + sync)
        closed = conn.read_until_ready()
        conn.send(parse(b"SELECT 'second'") + bind_execute + sync)
        second = conn.read_until_ready()

    def rows(messages):
        return [body for kind, body in messages if kind == b"D"]

    assert [k for k, _ in closed] == [b"3", b"Z"]
    assert rows(first) == [b"\0\x01\0\0\0\x05first"]
    assert rows(second) == [b"\0\x01\0\0\0\x06second"]


def test_notices_reach_the_client(proxy, module_db):
    notices = []
    with connect(proxy, module_db) as client:
        client.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        client.execute("DO $$ BEGIN RAISE NOTICE 'first'; RAISE NOTICE 'second'; END $$")

    assert notices == ["first", "second"]


def test_large_values_round_trip(proxy, module_db, pg):
    pg.psql("CREATE TABLE blobs (id int, data bytea)", dbname=module_db)
    payload = os.urandom(24 * 1024 * 1024)
    with connect(proxy, module_db) as client:
        client.execute("INSERT INTO blobs VALUES (1, %s)", [payload])
        digest, size = client.execute("SELECT sha256(data), length(data) FROM blobs").fetchone()
        back = client.execute("SELECT data FROM blobs").fetchone()[0]

    assert size == len(payload)
    assert bytes(digest) == hashlib.sha256(payload).digest()
    assert bytes(back) == payload


def test_simple_query_protocol_errors_leave_the_connection_ready(proxy, module_db):
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.start("postgres", module_db)
        conn.send(query("SELECT 1/0"))
        failed = conn.read_until_ready()
        conn.send(query(""))
        empty = conn.read_until_ready()
        conn.send(query("SELECT 'fine'"))
        fine = conn.read_until_ready()

    assert [k for k, _ in failed] == [b"E", b"Z"] and failed[-1][1] == b"I"
    assert [k for k, _ in empty] == [b"I", b"Z"]
    assert [k for k, _ in fine] == [b"T", b"D", b"C", b"Z"]


def first_column(data_row: bytes) -> bytes:
    """The first value of a DataRow body (text format)."""
    (length,) = struct.unpack_from("!i", data_row, 2)
    return data_row[6:6 + length]


def test_pipelined_simple_queries_are_answered_in_order(proxy, module_db):
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.start("postgres", module_db)
        conn.send(b"".join(query(f"SELECT {i}, pg_sleep(0.001)") for i in range(20)))
        answers = [conn.read_until_ready() for _ in range(20)]

    values = [first_column(body) for messages in answers for kind, body in messages if kind == b"D"]
    assert values == [str(i).encode() for i in range(20)]


def test_extended_batch_flushed_before_sync_keeps_its_backend(proxy, module_db):
    with RawConnection(proxy.host, proxy.port) as conn, Neighbours(proxy, module_db) as neighbours:
        conn.start("postgres", module_db)
        pids = []
        for _ in range(10):
            conn.send(message(b"P", b"\0SELECT pg_backend_pid()::text\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
                      + message(b"E", b"\0\0\0\0\0") + message(b"H"))
            kinds = []
            while not kinds or kinds[-1] != b"C":
                kind, body = conn.read_message()
                kinds.append(kind)
                if kind == b"D":
                    pids.append(body[6:])
            assert kinds == [b"1", b"2", b"D", b"C"]
            conn.send(message(b"S"))
            assert [k for k, _ in conn.read_until_ready()] == [b"Z"]

    assert len(pids) == 10
    assert neighbours.errors == []


def test_client_vanishing_mid_transaction_leaves_nothing_behind(fresh_db, pg, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=1, timeouts={"query_wait": 10})
    pg.psql("CREATE TABLE t (x int)", dbname=fresh_db)
    with RawConnection(proxy.host, proxy.port) as vanishing:
        vanishing.start("postgres", fresh_db)
        vanishing.send(query("BEGIN; INSERT INTO t VALUES (1); SET LOCAL TimeZone TO 'Asia/Tokyo'"))
        vanishing.read_until_ready()
    with connect(proxy, fresh_db) as next_client:
        with next_client.transaction():
            rows = next_client.execute("SELECT count(*) FROM t").fetchone()[0]
            zone = next_client.execute("SHOW TimeZone").fetchone()[0]

    assert rows == 0
    assert zone != "Asia/Tokyo"


def test_client_vanishing_mid_query_does_not_hold_the_backend_until_the_query_ends(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=1, timeouts={"query_wait": 10})
    with RawConnection(proxy.host, proxy.port) as vanishing:
        vanishing.start("postgres", fresh_db)
        vanishing.send(query("SELECT pg_sleep(60)"))
    with connect(proxy, fresh_db) as next_client:
        answer = next_client.execute("SELECT 'served'").fetchone()[0]

    assert answer == "served"


def test_many_distinct_prepared_statements_stay_correct_across_backends(proxy, module_db):
    texts = [f"SELECT %s::int + {n}" for n in range(300)]
    with connect(proxy, module_db, prepare_threshold=0) as client:
        forward = [client.execute(sql, [1]).fetchone()[0] for sql in texts]
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE):
            backward = [client.execute(sql, [2]).fetchone()[0] for sql in reversed(texts)]

    assert forward == [1 + n for n in range(300)]
    assert backward == [2 + n for n in reversed(range(300))]


def test_failed_parse_does_not_take_the_statement_name(proxy, module_db):
    sync = message(b"S")
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.start("postgres", module_db)
        conn.send(message(b"P", b"s1\0SELEC 1\0\0\0") + sync)
        failed = conn.read_until_ready()
        conn.send(message(b"P", b"s1\0SELECT 'parsed'\0\0\0") + message(b"B", b"\0s1\0\0\0\0\0\0\0")
                  + message(b"E", b"\0\0\0\0\0") + sync)
        second = conn.read_until_ready()

    assert [k for k, _ in failed] == [b"E", b"Z"]
    assert [k for k, _ in second] == [b"1", b"2", b"D", b"C", b"Z"], second
