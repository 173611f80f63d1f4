"""Transaction pooling semantics seen by one client: what stays on one backend, and what the protocol guarantees."""
from __future__ import annotations

import hashlib
import os
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
