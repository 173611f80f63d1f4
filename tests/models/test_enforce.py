"""Enforce mode (anomaly.enforce: [injection]): injection-shaped statements are refused with 42501 and never reach
Postgres; ordinary traffic goes through untouched."""
from __future__ import annotations

import re
import subprocess

import psycopg
import pytest
from psycopg import pq

from tests.ops.helpers import metric_samples

SIMPLE_PAYLOADS = (
    "SELECT name FROM guard_probe WHERE id = 1 OR 1=1",
    "SELECT name FROM guard_probe WHERE name = '' OR 'a'='a'",
    "SELECT name FROM guard_probe WHERE id = 1/**/OR/**/1=1",
    "SELECT name FROM guard_probe WHERE id = -1 UNION SELECT NULL",
    "SELECT name FROM guard_probe WHERE id = -1 UNION SELECT version()",
    "SELECT name FROM guard_probe WHERE id = 1; DELETE FROM guard_probe",
    "SELECT name FROM guard_probe WHERE id = 1; SELECT pg_sleep(0) --",
)
EXTENDED_PAYLOADS = (   # Parse messages: the text with $n, the values bound apart
    ("SELECT name FROM guard_probe WHERE id = $1 OR 1=1", [b"1"]),
    ("SELECT name FROM guard_probe WHERE id = $1 UNION SELECT NULL", [b"-1"]),
)
PROBE_ROWS = 10


def sqlstate(res) -> str | None:
    if res.status == pq.ExecStatus.FATAL_ERROR:
        return res.error_field(pq.DiagnosticField.SQLSTATE).decode()
    return None


@pytest.fixture
def guarded(pg, fresh_db, proxy_factory):
    """A proxy enforcing the injection class in front of a database with a small table and pg_stat_statements."""
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; "
            "CREATE TABLE guard_probe (id int PRIMARY KEY, name text NOT NULL); "
            f"INSERT INTO guard_probe SELECT i, 'name ' || i FROM generate_series(1, {PROBE_ROWS}) i", dbname=fresh_db)
    proxy = proxy_factory(fresh_db, anomaly={"enforce": ["injection"]}, models={"enabled": False})
    conn = psycopg.connect(proxy.dsn(fresh_db), autocommit=True)
    yield proxy, conn
    conn.close()


def upstream_statements(pg, dbname: str) -> list[str]:
    """What pg_stat_statements recorded on the upstream for this database's probe table."""
    out = pg.psql("SELECT query FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                  f"WHERE d.datname = '{dbname}' AND query LIKE '%guard_probe%'", dbname=dbname)
    return [line for line in out.splitlines() if line.strip()]


def test_injection_shaped_statements_are_refused_with_42501(guarded):
    _, conn = guarded
    for sql in SIMPLE_PAYLOADS:
        res = conn.pgconn.exec_(sql.encode())
        assert sqlstate(res) == "42501", sql
        assert b"shaped like an injection" in res.error_message
    for sql, params in EXTENDED_PAYLOADS:
        res = conn.pgconn.exec_params(sql.encode(), params)
        assert sqlstate(res) == "42501", sql


def test_refused_statements_never_reach_postgres(pg, fresh_db, guarded):
    proxy, conn = guarded
    for sql in SIMPLE_PAYLOADS:
        conn.pgconn.exec_(sql.encode())
    for sql, params in EXTENDED_PAYLOADS:
        conn.pgconn.exec_params(sql.encode(), params)
    conn.execute("SELECT name FROM guard_probe WHERE id = 3").fetchone()   # the ordinary shape does arrive
    seen = upstream_statements(pg, fresh_db)
    assert any(re.search(r"WHERE id = \$1\s*$", q) for q in seen), seen
    for q in seen:
        assert not re.search(r"\bOR\b|UNION|DELETE|pg_sleep", q, re.I), q
    assert conn.execute("SELECT count(*) FROM guard_probe").fetchone()[0] == PROBE_ROWS
    refused = metric_samples(proxy)[("pgpilot_guard_refused_total", (("class", "injection"),))]
    assert refused == len(SIMPLE_PAYLOADS) + len(EXTENDED_PAYLOADS)


def test_the_session_goes_on_after_a_refusal(guarded):
    _, conn = guarded
    assert sqlstate(conn.pgconn.exec_(b"SELECT name FROM guard_probe WHERE id = 1 OR 1=1")) == "42501"
    assert conn.execute("SELECT name FROM guard_probe WHERE id = %s", (2,)).fetchone() == ("name 2",)
    with conn.transaction():
        conn.execute("UPDATE guard_probe SET name = 'two' WHERE id = 2")
    assert conn.execute("SELECT name FROM guard_probe WHERE id = 2").fetchone() == ("two",)


def test_ordinary_traffic_passes_untouched(pg, fresh_db, guarded):
    proxy, _ = guarded
    bindir = pg.bindir
    subprocess.run([f"{bindir}/pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", pg.user,
                    fresh_db], check=True, capture_output=True)
    for protocol in ("simple", "extended"):
        run = subprocess.run([f"{bindir}/pgbench", "-n", "-M", protocol, "-T", "2", "-c", "4", "-h", proxy.host,
                              "-p", str(proxy.port), "-U", pg.user, fresh_db], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert re.search(r"number of failed transactions: 0\b", run.stdout), run.stdout
    assert metric_samples(proxy)[("pgpilot_guard_refused_total", (("class", "injection"),))] == 0
