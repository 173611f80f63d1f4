"""Client-side helpers for the operations tests: the admin console through psql and psycopg, and /metrics."""
from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families


def admin_psql(proxy, sql: str, user: str = "postgres", timeout: float = 30) -> subprocess.CompletedProcess:
    """psql on the admin console, unaligned with headers: first line the column names, then rows."""
    return subprocess.run(
        ["psql", "-X", "-A", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", "pgpilot", "-c", sql],
        capture_output=True, text=True, timeout=timeout)


def admin_rows(proxy, sql: str, user: str = "postgres") -> list[dict]:
    """A SHOW command's rows as dicts, through psycopg (simple protocol, typed values)."""
    with admin_connect(proxy, user) as conn:
        cur = conn.execute(sql)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def admin_connect(proxy, user: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn("pgpilot", user=user), autocommit=True, connect_timeout=10,
                           cursor_factory=psycopg.ClientCursor)


def pool_row(proxy, database: str) -> dict:
    return next(r for r in admin_rows(proxy, "SHOW POOLS") if r["database"] == database)


def http_get(proxy, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.http_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric_samples(proxy) -> dict[tuple, float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, text = http_get(proxy, "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value (the tests wait for states, never for time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
