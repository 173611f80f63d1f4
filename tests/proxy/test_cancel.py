"""CancelRequest through the proxy reaches the backend running the client's query, and nothing else."""
from __future__ import annotations

import threading
import time

import psycopg

from tests.proxy.helpers import connect


def wait_until_running(pg, dbname: str, sql: str, count: int = 1, timeout: float = 10) -> None:
    """Wait until `count` backends of `dbname` are executing exactly `sql`."""
    with psycopg.connect(pg.dsn_for(dbname), autocommit=True) as direct:
        deadline = time.monotonic() + timeout
        while True:
            running = direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active' AND query = %s",
                [dbname, sql]).fetchone()[0]
            if running >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{sql!r} never started running on the upstream")
            time.sleep(0.02)


class Query(threading.Thread):
    """Run one query on a connection in the background; keep its result or exception and its duration."""

    def __init__(self, conn: psycopg.Connection, sql: str):
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.result = self.error = None
        self.seconds: float | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.result = self.conn.execute(self.sql).fetchone()[0]
        except psycopg.Error as e:
            self.error = e
        self.seconds = time.monotonic() - started


def test_cancel_stops_the_running_query_with_57014_and_spares_other_clients(fresh_db, pg, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=4)
    long_sql, short_sql = "SELECT pg_sleep(10)", "SELECT pg_sleep(1)::text || 'slept'"
    with connect(proxy, fresh_db) as victim, connect(proxy, fresh_db) as bystander:
        long_query, short_query = Query(victim, long_sql), Query(bystander, short_sql)
        long_query.start()
        short_query.start()
        wait_until_running(pg, fresh_db, long_sql)
        wait_until_running(pg, fresh_db, short_sql)

        victim.cancel_safe()
        long_query.join(15)
        short_query.join(15)
        after = victim.execute("SELECT 'still usable'").fetchone()[0]

    assert isinstance(long_query.error, psycopg.errors.QueryCanceled), long_query.error
    assert long_query.error.sqlstate == "57014"
    assert long_query.seconds < 8, "the cancel did not reach the backend; the sleep ran to its end"
    assert short_query.error is None and short_query.result == "slept"
    assert after == "still usable"


def test_cancel_from_an_idle_client_does_not_touch_the_query_on_its_former_backend(fresh_db, pg, proxy_factory):
    # One backend: the idle client's former backend is the one now running the other client's query.
    proxy = proxy_factory(dbname=fresh_db, pool_size=1)
    sql = "SELECT pg_sleep(1)::text || 'slept'"
    with connect(proxy, fresh_db) as idle, connect(proxy, fresh_db) as busy:
        idle.execute("SELECT 1")
        query = Query(busy, sql)
        query.start()
        wait_until_running(pg, fresh_db, sql)

        idle.cancel_safe()
        query.join(15)

    assert query.error is None, f"another client's cancel hit this query: {query.error}"
    assert query.result == "slept"


def test_cancel_with_unknown_key_is_ignored(fresh_db, pg, proxy_factory):
    import socket
    import struct

    from tests.support.wire import CANCEL_REQUEST_CODE

    proxy = proxy_factory(dbname=fresh_db, pool_size=2)
    sql = "SELECT pg_sleep(1)::text || 'slept'"
    with connect(proxy, fresh_db) as busy:
        query = Query(busy, sql)
        query.start()
        wait_until_running(pg, fresh_db, sql)
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
            s.sendall(struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, 12345, 67890))
            assert s.recv(1) == b""  # the proxy closes a cancel connection without answering
        query.join(15)

    assert query.error is None and query.result == "slept"
    assert proxy.alive()


def test_cancel_while_waiting_for_a_backend_ends_the_wait_with_57014(fresh_db, pg, proxy_factory):
    # query_wait is long: without the cancel the waiting client would get 53300 much later.
    proxy = proxy_factory(dbname=fresh_db, pool_size=1, timeouts={"query_wait": 30})
    with connect(proxy, fresh_db, autocommit=False) as holder, connect(proxy, fresh_db) as waiter:
        holder.execute("SELECT 1")  # an open transaction holds the only backend
        query = Query(waiter, "SELECT 'got a backend'")
        query.start()
        query.join(1)  # give it time to queue; still waiting, whatever the machine's speed
        waiter.cancel_safe()
        query.join(20)
        holder.rollback()
        after = waiter.execute("SELECT 'usable'").fetchone()[0]

    assert isinstance(query.error, psycopg.errors.QueryCanceled), query.error
    assert after == "usable"
