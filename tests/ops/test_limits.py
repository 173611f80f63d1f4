"""Limits: oversized messages refused before allocation, per-user and per-database connection caps (53300)."""
from __future__ import annotations

import struct

import psutil
import pytest

from tests.proxy.helpers import connect
from tests.support.proxy import upstream_entry
from tests.support.wire import RawConnection, error_fields, query, startup_packet

TWO_GB = 1 << 31


def refusal(messages) -> tuple[str, str]:
    errors = [error_fields(body) for kind, body in messages if kind == b"E"]
    assert len(errors) == 1, messages
    return errors[0]["S"], errors[0]["C"]


def startup_refusal(proxy, user: str, dbname: str) -> dict:
    with RawConnection(proxy.host, proxy.port) as raw:
        raw.send(startup_packet(user, dbname))
        messages = raw.read_until_closed()
    errors = [error_fields(body) for kind, body in messages if kind == b"E"]
    assert errors, messages
    return errors[0]


@pytest.fixture
def proxy(pg, proxy_factory):
    return proxy_factory(max_message_bytes=1 << 20)


def rss(proxy) -> int:
    return psutil.Process(proxy.proc.pid).memory_info().rss


def test_a_two_gigabyte_message_length_is_refused_without_allocating(proxy, pg):
    with RawConnection(proxy.host, proxy.port) as warmup:   # the first client's code paths allocate once
        warmup.start("postgres", pg.dbname)
        warmup.send(query("SELECT 1"))
        warmup.read_until_ready()
    before = rss(proxy)

    with RawConnection(proxy.host, proxy.port) as raw:
        raw.start("postgres", pg.dbname)
        raw.send(b"Q" + struct.pack("!I", TWO_GB) + b"SELECT 1" * 1000)
        told = raw.read_until_closed()

    assert refusal(told) == ("FATAL", "08P01")
    # Buffering the declared length would add 2 GiB; the proxy's background tasks (log feed, writer)
    # move RSS by a few MiB on their own, so the bar sits far above that noise and far below 2 GiB.
    assert rss(proxy) - before < 64 * 1024 * 1024
    with connect(proxy, pg.dbname) as other:
        assert other.execute("SELECT 1").fetchone()[0] == 1


def test_a_message_over_max_message_bytes_is_refused(proxy, pg):
    with RawConnection(proxy.host, proxy.port) as raw:
        raw.start("postgres", pg.dbname)
        raw.send(b"Q" + struct.pack("!I", (1 << 20) + 5))
        told = raw.read_until_closed()

    assert refusal(told) == ("FATAL", "08P01")


def test_a_two_gigabyte_startup_packet_length_is_refused(proxy):
    before = rss(proxy)
    with RawConnection(proxy.host, proxy.port) as raw:
        raw.send(struct.pack("!I", TWO_GB) + struct.pack("!I", 196608))
        told = raw.read_until_closed()

    assert refusal(told) == ("FATAL", "08P01")
    # Buffering the declared length would add 2 GiB; the proxy's background tasks (log feed, writer)
    # move RSS by a few MiB on their own, so the bar sits far above that noise and far below 2 GiB.
    assert rss(proxy) - before < 64 * 1024 * 1024


def test_a_two_gigabyte_message_to_the_admin_console_is_refused(proxy):
    with RawConnection(proxy.host, proxy.port) as raw:
        raw.start("postgres", "pgpilot")
        raw.send(b"Q" + struct.pack("!I", TWO_GB))
        told = raw.read_until_closed()

    assert refusal(told) == ("FATAL", "08P01")


def test_per_user_cap_refuses_the_extra_connection_with_53300(pg, proxy_factory):
    proxy = proxy_factory(max_client_conn_per_user=2)
    first, second = connect(proxy, pg.dbname), connect(proxy, pg.dbname)

    refused = startup_refusal(proxy, "postgres", pg.dbname)
    other_user = connect(proxy, pg.dbname, user="someone_else")
    second.close()
    third = connect(proxy, pg.dbname)

    assert (refused["S"], refused["C"]) == ("FATAL", "53300")
    assert refused["M"] == 'too many connections for role "postgres"'
    assert other_user.execute("SELECT 1").fetchone()[0] == 1
    assert third.execute("SELECT 1").fetchone()[0] == 1
    for c in (first, other_user, third):
        c.close()


def test_per_database_cap_refuses_the_extra_connection_with_53300(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(max_client_conn_per_database=1,
                          databases={pg.dbname: upstream_entry(pg), fresh_db: upstream_entry(pg, fresh_db)})
    first = connect(proxy, pg.dbname)

    refused = startup_refusal(proxy, "someone_else", pg.dbname)
    elsewhere = connect(proxy, fresh_db)

    assert (refused["S"], refused["C"]) == ("FATAL", "53300")
    assert refused["M"] == f'too many connections for database "{pg.dbname}"'
    assert elsewhere.execute("SELECT 1").fetchone()[0] == 1
    first.close()
    elsewhere.close()


def test_admin_console_is_not_held_back_by_the_caps(pg, proxy_factory):
    proxy = proxy_factory(max_client_conn_per_user=1)
    app = connect(proxy, pg.dbname)

    with RawConnection(proxy.host, proxy.port) as raw:
        greeting = raw.start("postgres", "pgpilot")

    assert greeting[-1][0] == b"Z"
    app.close()
