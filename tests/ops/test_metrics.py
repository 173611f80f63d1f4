"""GET /metrics (checked by promtool), /healthz and /readyz on admin.http_listen."""
from __future__ import annotations

import subprocess

import psycopg
import pytest

from tests.ops.helpers import http_get, metric_samples
from tests.proxy.helpers import connect
from tests.support.services import free_port


@pytest.fixture
def proxy(pg, proxy_factory):
    return proxy_factory(pool_size=2)


def test_metrics_pass_promtool_check(proxy, pg):
    with connect(proxy, pg.dbname) as client:
        client.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            client.execute("SELECT 1/0")
        client.execute("SELECT 'it''s \"quoted\"'")

    status, text = http_get(proxy, "/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)

    assert status == 200
    assert check.returncode == 0, check.stdout + check.stderr
    assert "pgpilot_query_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text


def test_queries_counter_moves_by_the_number_of_queries(proxy, pg):
    key = ("pgpilot_queries_total", (("database", pg.dbname), ("user", "postgres")))
    with connect(proxy, pg.dbname) as client:
        client.execute("SELECT 0")
        before = metric_samples(proxy)[key]
        for i in range(100):
            client.execute("SELECT %s::int", (i,))
        after = metric_samples(proxy)[key]

    assert after - before == 100


def test_query_errors_are_counted_by_sqlstate_class(proxy, pg):
    with connect(proxy, pg.dbname) as client:
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                client.execute("SELECT 1/0")

    samples = metric_samples(proxy)
    key = ("pgpilot_query_errors_total", (("database", pg.dbname), ("sqlstate_class", "22"), ("user", "postgres")))
    assert samples[key] == 3


def test_duration_histogram_counts_every_statement(proxy, pg):
    with connect(proxy, pg.dbname) as client:
        for _ in range(5):
            client.execute("SELECT 1")

    samples = metric_samples(proxy)
    labels = (("database", pg.dbname), ("le", "+Inf"), ("user", "postgres"))
    count = samples[("pgpilot_query_duration_seconds_bucket", labels)]
    assert count == samples[("pgpilot_queries_total", (("database", pg.dbname), ("user", "postgres")))] == 5


def test_open_connections_show_in_client_and_server_gauges(proxy, pg):
    with connect(proxy, pg.dbname, autocommit=False) as client:
        client.execute("SELECT 1")
        samples = metric_samples(proxy)
        client.rollback()

    assert samples[("pgpilot_client_connections", (("database", pg.dbname), ("state", "active")))] == 1
    assert samples[("pgpilot_server_connections", (("database", pg.dbname), ("state", "active")))] == 1


def test_bytes_of_open_connections_are_counted_live(proxy, pg):
    key = ("pgpilot_client_sent_bytes_total", (("database", pg.dbname), ("user", "postgres")))
    with connect(proxy, pg.dbname) as client:
        client.execute("SELECT 1")
        before = metric_samples(proxy).get(key, 0)
        client.execute("SELECT repeat('x', 100000)")
        after = metric_samples(proxy)[key]

    assert after - before > 100000


def test_healthz_answers_ok(proxy):
    assert http_get(proxy, "/healthz") == (200, "ok\n")


def test_readyz_answers_ok_when_every_database_has_a_backend(proxy):
    assert http_get(proxy, "/readyz") == (200, "ready\n")


def test_readyz_is_503_naming_a_database_whose_upstream_is_down(pg, proxy_factory):
    proxy = proxy_factory(databases={
        pg.dbname: {"host": pg.host, "port": pg.port, "user": pg.user},
        "gone": {"host": "127.0.0.1", "port": free_port(), "user": "postgres"},
    }, timeouts={"connect": 2})

    status, body = http_get(proxy, "/readyz")

    assert status == 503
    assert body.startswith("gone: ") and pg.dbname not in body


def test_unknown_path_is_404(proxy):
    assert http_get(proxy, "/nope")[0] == 404


def test_query_log_counters_are_exported_when_the_log_is_on(pg, fresh_db, proxy_factory, tmp_path):
    proxy = proxy_factory(query_log={"enabled": True, "dsn": pg.dsn_for(fresh_db), "spool_dir": str(tmp_path)})
    with connect(proxy, pg.dbname) as client:
        for i in range(10):
            client.execute("SELECT %s::int", (i,))

    status, text = http_get(proxy, "/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    samples = metric_samples(proxy)

    assert check.returncode == 0, check.stdout + check.stderr
    assert samples[("pgpilot_querylog_events_submitted_total", ())] >= 10
