"""The statements collector: pg_stat_statements snapshots, deltas per fingerprint, and missing-extension notices."""
from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from pglast.parser import fingerprint

from learning.collectors import run_collectors
from learning.collectors.statements import compute_deltas
from tests.support.services import PgCluster

QUERY = "SELECT balance FROM accounts WHERE id = {}"


@pytest.fixture
def accounts(app):
    app.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
    app.execute("INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 100) g")
    return app


def deltas_for(conn, sql: str) -> list[tuple]:
    return conn.execute("SELECT calls, basis FROM pgpilot.statement_deltas WHERE fingerprint = %s ORDER BY ts",
                        (fingerprint(sql),)).fetchall()


def test_delta_counts_the_calls_made_between_two_snapshots(app_dsn, accounts):
    for i in range(10):
        accounts.execute(QUERY.format(i))
    run_collectors(app_dsn, only={"statements"})
    for i in range(500):
        accounts.execute(QUERY.format(i % 100 + 1))
    run_collectors(app_dsn, only={"statements"})

    assert deltas_for(accounts, QUERY.format(42)) == [(500, "previous")]


def test_snapshot_fingerprints_join_the_proxy_templates(app_dsn, accounts):
    accounts.execute(QUERY.format(7))
    accounts.execute("INSERT INTO pgpilot.templates (fingerprint, normalized_sql, kind, first_seen, last_seen) "
                     "VALUES (%s, %s, 'select', now(), now())", (fingerprint(QUERY.format(7)), QUERY.format("$1")))
    run_collectors(app_dsn, only={"statements"})

    joined = accounts.execute("SELECT t.normalized_sql, s.calls FROM pgpilot.statement_snapshots s "
                              "JOIN pgpilot.templates t USING (fingerprint)").fetchall()
    assert joined == [(QUERY.format("$1"), 1)]


def test_counters_that_went_down_are_taken_as_a_reset(app_dsn, accounts):
    for i in range(10):
        accounts.execute(QUERY.format(i))
    run_collectors(app_dsn, only={"statements"})
    accounts.execute("SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database "
                     "WHERE datname = current_database()), 0)")
    for i in range(7):
        accounts.execute(QUERY.format(i))
    run_collectors(app_dsn, only={"statements"})

    assert deltas_for(accounts, QUERY.format(1)) == [(7, "reset")]


def test_a_moved_stats_reset_time_makes_every_entry_a_reset():
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    entry = {"userid": 10, "queryid": 1, "toplevel": True, "fingerprint": "ab", "total_exec_time": 5.0, "rows": 1,
             "shared_blks_hit": 0, "shared_blks_read": 0, "temp_blks_read": 0, "temp_blks_written": 0,
             "wal_records": 0, "wal_bytes": 0}
    before, after = {**entry, "calls": 3}, {**entry, "calls": 4}

    [delta] = compute_deltas([after], [before], prev_stats_reset=t0, stats_reset=t0 + dt.timedelta(hours=1))

    assert (delta["basis"], delta["calls"]) == ("reset", 4)


def test_first_snapshot_writes_no_deltas(app_dsn, accounts):
    accounts.execute(QUERY.format(1))
    summary = run_collectors(app_dsn, only={"statements"})

    assert summary["statements"]["tables"]["statement_snapshots"] > 0
    assert summary["statements"]["tables"].get("statement_deltas", 0) == 0


def test_extension_not_preloaded_gives_a_notice_and_the_other_collectors_still_run():
    cluster = PgCluster(settings={"shared_preload_libraries": ""}).start()
    try:
        summary = run_collectors(cluster.dsn)
        with psycopg.connect(cluster.dsn) as conn:
            created = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
    finally:
        cluster.destroy()

    assert summary["statements"]["rows"] == 0
    assert any("shared_preload_libraries" in n for n in summary["statements"]["notices"])
    assert created == (0,)
    assert summary["performance"]["rows"] > 0 and summary["resources"]["rows"] > 0


def test_a_role_that_may_not_create_the_extension_gets_a_notice(pg, fresh_db, app_dsn, role):
    summary = run_collectors(app_dsn, {fresh_db: pg.dsn_for(fresh_db).replace("postgres@", f"{role}@")},
                             only={"statements"})

    [notice] = summary["statements"]["notices"]
    assert "could not be" in notice and "CREATE EXTENSION pg_stat_statements" in notice
