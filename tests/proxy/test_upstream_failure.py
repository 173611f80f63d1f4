"""The upstream going away: clients get class 08 errors that say so, and service resumes when it is back.

Each test runs its own PostgreSQL cluster so it can stop, restart or crash it without disturbing others.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from tests.proxy.helpers import connect
from tests.support.proxy import upstream_entry
from tests.support.services import PgCluster
from tests.support.wire import RawConnection, error_fields, startup_packet


@pytest.fixture
def upstream():
    """A private cluster, initialised but not started."""
    cluster = PgCluster().init()
    yield cluster
    cluster.destroy()


@pytest.fixture
def proxy(upstream, proxy_factory):
    return proxy_factory(databases={"postgres": upstream_entry(upstream, "postgres")}, pool_size=4,
                         timeouts={"connect": 3, "query_wait": 10})


def startup_error(proxy) -> dict[str, str]:
    """The ErrorResponse a new client gets at startup (fails if the proxy lets it in)."""
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.send(startup_packet("app", "postgres"))
        for kind, body in conn.read_until_closed(timeout=15):
            if kind == b"E":
                return error_fields(body)
            if kind == b"Z":
                raise AssertionError("the client was let in while the upstream is down")
    raise AssertionError("the proxy closed the connection without an ErrorResponse")


def says_what_failed(message: str, upstream) -> bool:
    return any(word in message.lower() for word in ("upstream", "connect", "refused", str(upstream.port)))


def test_upstream_down_at_start_refuses_clients_with_08006_then_serves_once_it_is_up(upstream, proxy):
    refusal = startup_error(proxy)
    upstream.start()
    with connect(proxy, "postgres") as client:
        answer = client.execute("SELECT 'up'").fetchone()[0]

    assert refusal["S"] == "FATAL"
    assert refusal["C"] == "08006"
    assert says_what_failed(refusal["M"], upstream), refusal
    assert answer == "up"
    assert proxy.alive()


def test_upstream_restart_gives_connected_clients_08_errors_then_their_retries_succeed(upstream, proxy):
    upstream.start()
    with connect(proxy, "postgres") as client:
        assert client.execute("SELECT 1").fetchone()[0] == 1
        upstream.stop()
        with pytest.raises(psycopg.Error) as failure:
            client.execute("SELECT 2")
        refusal = startup_error(proxy)
        upstream.start()
        retry = client.execute("SELECT 'back'").fetchone()[0]
    with connect(proxy, "postgres") as newcomer:
        fresh = newcomer.execute("SELECT 'new client'").fetchone()[0]

    assert failure.value.sqlstate and failure.value.sqlstate.startswith("08"), repr(failure.value)
    assert says_what_failed(str(failure.value), upstream), str(failure.value)
    assert refusal["C"].startswith("08"), refusal
    assert retry == "back"
    assert fresh == "new client"
    assert proxy.alive()


def test_backend_dying_mid_query_gives_a_class_08_error_and_service_resumes(upstream, proxy):
    upstream.start()
    outcome: dict = {}

    def long_query(conn):
        try:
            conn.execute("SELECT pg_sleep(30)")
            outcome["error"] = None
        except psycopg.Error as e:
            outcome["error"] = e

    with connect(proxy, "postgres") as client, psycopg.connect(upstream.dsn, autocommit=True) as direct:
        worker = threading.Thread(target=long_query, args=(client,), daemon=True)
        worker.start()
        os.kill(running_backend(direct, "SELECT pg_sleep(30)"), signal.SIGKILL)
        worker.join(20)
        resumed = retry_until_answered(proxy, client, "SELECT 'resumed'")

    error = outcome.get("error")
    assert error is not None, "the query did not fail although its backend died"
    assert error.sqlstate and error.sqlstate.startswith("08"), repr(error)
    assert resumed == "resumed"
    assert proxy.alive()


def running_backend(direct: psycopg.Connection, sql: str, timeout: float = 10) -> int:
    """The pid of the upstream backend executing `sql`, once it has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = direct.execute("SELECT pid FROM pg_stat_activity WHERE query = %s", [sql]).fetchone()
        if row:
            return row[0]
        time.sleep(0.02)
    raise AssertionError(f"{sql!r} never started on the upstream")


def retry_until_answered(proxy, conn: psycopg.Connection, sql: str, attempts: int = 60):
    """What a client does after a connection-class error: retry, reconnecting if closed, while the server recovers."""
    reconnected = None
    try:
        for _ in range(attempts):
            try:
                if conn.closed:
                    conn = reconnected = connect(proxy, "postgres")
                return conn.execute(sql).fetchone()[0]
            except psycopg.Error:
                time.sleep(0.5)
    finally:
        if reconnected is not None:
            reconnected.close()
    raise AssertionError(f"{sql!r} never succeeded after the upstream recovered")
