"""Structured log lines: client=<id> and backend=<pid> fields tie a connection's lines together (JSON keys with json)."""
from __future__ import annotations

import json

import psycopg
import pytest

from tests.ops.helpers import admin_psql, admin_rows, wait_until
from tests.proxy.helpers import backend_pid, connect


def killed_in_a_transaction(proxy, dbname: str) -> tuple[int, int]:
    """A client killed from the console while in a transaction: (its client id, its backend pid)."""
    client = connect(proxy, dbname, autocommit=False)
    pid = backend_pid(client)
    client_id = next(r["id"] for r in admin_rows(proxy, "SHOW CLIENTS") if r["database"] == dbname)
    assert admin_psql(proxy, f"KILL {client_id}").returncode == 0
    with pytest.raises(psycopg.OperationalError):
        client.execute("SELECT 1")
    client.close()
    return client_id, pid


def test_json_log_lines_carry_client_and_backend_as_fields(pg, proxy_factory):
    proxy = proxy_factory(log_format="json")

    client_id, pid = killed_in_a_transaction(proxy, pg.dbname)
    wait_until(lambda: '"client disconnected"' in proxy.log(), what="the disconnect line")

    lines = [json.loads(line) for line in proxy.log().splitlines() if line.strip()]
    mine = [doc for doc in lines if doc.get("client") == client_id]
    by_msg = {doc["msg"].split(":")[0]: doc for doc in mine}
    assert by_msg["client connected"]["user"] == "postgres"
    assert by_msg["client connected"]["database"] == pg.dbname
    assert by_msg["closed with FATAL 57P01"]["backend"] == pid
    assert by_msg["closed with FATAL 57P01"]["sqlstate"] == "57P01"
    assert by_msg["client disconnected"]["bytes_in"] > 0


def test_plain_log_lines_end_with_key_value_fields(pg, proxy_factory):
    proxy = proxy_factory(log_format="plain")

    client_id, pid = killed_in_a_transaction(proxy, pg.dbname)

    fatal = next(line for line in proxy.log().splitlines() if "closed with FATAL 57P01" in line)
    assert f"client={client_id} backend={pid} sqlstate=57P01" in fatal


def test_log_connections_off_leaves_connects_out(pg, proxy_factory):
    proxy = proxy_factory(log_connections=False)

    with connect(proxy, pg.dbname) as client:
        client.execute("SELECT 1")

    assert "client connected" not in proxy.log()
