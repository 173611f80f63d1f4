"""Connecting through the proxy: who may connect, what is refused, TLS negotiation, and waiting for a backend."""
from __future__ import annotations

import time

import psycopg
import pytest

from tests.proxy.helpers import connect
from tests.support.wire import (GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, RawConnection, error_fields, query,
                                special_request, startup_packet)


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=2)


def test_any_client_user_name_is_accepted_and_runs_as_the_configured_user(proxy, module_db):
    with psycopg.connect(proxy.dsn(module_db, user="reporting_app"), autocommit=True) as conn:
        user = conn.execute("SELECT current_user").fetchone()[0]

    assert user == "postgres"


def test_unknown_database_is_refused_with_3D000(proxy):
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.send(startup_packet("app", "no_such_database"))
        answers = conn.read_until_closed()

    errors = [error_fields(body) for kind, body in answers if kind == b"E"]
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "3D000")]
    assert "no_such_database" in errors[0]["M"]
    assert not any(kind == b"Z" for kind, _ in answers)


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE], ids=["SSLRequest", "GSSENCRequest"])
def test_encryption_request_is_declined_with_N_and_startup_continues(proxy, module_db, code):
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.send(special_request(code))
        answer = conn.read_byte()
        conn.start("app", module_db)
        conn.send(query("SELECT 'plain text'"))
        messages = conn.read_until_ready()

    assert answer == b"N"
    assert any(kind == b"D" and b"plain text" in body for kind, body in messages)


def test_libpq_with_sslmode_prefer_falls_back_to_plain_text(proxy, module_db):
    with psycopg.connect(proxy.dsn(module_db, sslmode="prefer"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert conn.pgconn.ssl_in_use is False


def test_client_waiting_longer_than_query_wait_gets_53300_and_can_retry(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=1, timeouts={"query_wait": 1})
    with connect(proxy, fresh_db, autocommit=False) as holder, connect(proxy, fresh_db) as waiter:
        holder.execute("SELECT 1")  # an open transaction holds the only backend
        with pytest.raises(psycopg.Error) as refused:
            waiter.execute("SELECT 'waited'")
        holder.commit()
        retry = waiter.execute("SELECT 'served'").fetchone()[0]

    assert refused.value.sqlstate == "53300"
    assert retry == "served"


def test_clients_beyond_max_client_conn_are_refused_with_53300(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=2, max_client_conn=3)
    clients = [connect(proxy, fresh_db) for _ in range(3)]
    try:
        with RawConnection(proxy.host, proxy.port) as extra:
            extra.send(startup_packet("app", fresh_db))
            answers = extra.read_until_closed()
        clients.pop().close()
        clients.append(connect_when_admitted(proxy, fresh_db))
        served = [c.execute("SELECT 1").fetchone()[0] for c in clients]
    finally:
        for c in clients:
            c.close()

    errors = [error_fields(body) for kind, body in answers if kind == b"E"]
    assert [e["C"] for e in errors] == ["53300"]
    assert served == [1, 1, 1]


def connect_when_admitted(proxy, dbname: str, attempts: int = 50) -> psycopg.Connection:
    """A freed client slot is released when the proxy notices the close; retry briefly until then."""
    for _ in range(attempts):
        try:
            return connect(proxy, dbname)
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise AssertionError("a client slot freed by a disconnect never became available")
