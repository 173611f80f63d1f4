"""The performance collector: database counters, checkpointer, activity and locks, and the local host."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from learning.collectors import run_collectors


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def blocked_reader(app_dsn, app):
    """One connection idle in a transaction holding an exclusive lock, another blocked behind it."""
    app.execute("CREATE TABLE ledger (id int)")
    holder = psycopg.connect(app_dsn, application_name="holder")
    holder.execute("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
    reader = psycopg.connect(app_dsn, autocommit=True, application_name="reader")
    thread = threading.Thread(target=lambda: reader.execute("SELECT count(*) FROM ledger"))
    thread.start()
    wait_until(lambda: app.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reader' "
                                   "AND wait_event_type = 'Lock'").fetchone()[0] == 1)
    yield
    holder.rollback()
    thread.join()
    holder.close()
    reader.close()


def test_activity_counts_blocked_backends_waiting_locks_and_states(app_dsn, app, blocked_reader):
    run_collectors(app_dsn, only={"performance"})

    by_state, blocked, waiting, locks, longest_xact, longest_query = app.execute(
        "SELECT by_state, blocked_backends, locks_waiting, locks_by_mode, longest_transaction_seconds, "
        "longest_query_seconds FROM pgpilot.activity_stats").fetchone()
    assert by_state["idle in transaction"] == 1 and by_state["active"] == 1
    assert blocked == 1 and waiting == 1
    assert locks["AccessExclusiveLock"] >= 1
    assert longest_xact > 0 and longest_query > 0


def test_database_and_checkpointer_counters_are_recorded(app_dsn, app):
    summary = run_collectors(app_dsn, only={"performance"})

    size, commits, blks_hit = app.execute("SELECT size_bytes, xact_commit, blks_hit FROM pgpilot.database_stats"
                                          ).fetchone()
    assert size > 1_000_000 and commits > 0 and blks_hit > 0
    assert summary["performance"]["tables"]["checkpointer_stats"] == 1
    assert app.execute("SELECT buffers_alloc > 0 FROM pgpilot.checkpointer_stats").fetchone() == (True,)


def test_host_counters_are_recorded_for_a_server_on_this_machine(app_dsn, app):
    run_collectors(app_dsn, only={"performance"})

    cpus, mem_total, mem_available, user_seconds = app.execute(
        "SELECT cpu_count, mem_total_bytes, mem_available_bytes, cpu_user_seconds FROM pgpilot.host_stats").fetchone()
    assert cpus >= 1 and 0 < mem_available <= mem_total and user_seconds > 0
