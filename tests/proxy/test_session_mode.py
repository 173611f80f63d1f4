"""Session pooling: a client owns one backend for its whole connection, and the next client finds it reset."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.proxy.helpers import backend_pid, connect


@pytest.fixture
def defaults(pg, fresh_db) -> dict[str, str]:
    with psycopg.connect(pg.dsn_for(fresh_db)) as direct:
        return {name: direct.execute(f"SHOW {name}").fetchone()[0]
                for name in ("search_path", "TimeZone", "statement_timeout")}


def test_session_mode_client_keeps_one_backend_for_its_whole_connection(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_mode="session", pool_size=3)
    pids: dict[str, set[int]] = {"a": set(), "b": set()}
    with connect(proxy, fresh_db) as a, connect(proxy, fresh_db) as b:
        for _ in range(20):
            for name, conn in (("a", a), ("b", b)):
                with conn.transaction():
                    pids[name].add(backend_pid(conn))
            with connect(proxy, fresh_db) as passer_by:
                passer_by.execute("SELECT 1")

    assert len(pids["a"]) == 1 and len(pids["b"]) == 1
    assert pids["a"] != pids["b"]


def test_session_mode_resets_the_backend_before_the_next_client(fresh_db, proxy_factory, defaults):
    proxy = proxy_factory(dbname=fresh_db, pool_mode="session", pool_size=1)
    with connect(proxy, fresh_db) as first:
        first.execute("SET search_path TO pg_catalog")
        first.execute("SET TimeZone TO 'Asia/Tokyo'")
        first.execute("SET statement_timeout TO '7s'")
        first.execute("PREPARE leftover AS SELECT 1")
        first.execute("CREATE TEMP TABLE scratch (n int)")
        first.execute("LISTEN jobs")
        first.execute("SELECT pg_advisory_lock(7)")
        first_pid = backend_pid(first)
    with connect(proxy, fresh_db) as second:
        second_pid = backend_pid(second)
        settings = {name: second.execute(f"SHOW {name}").fetchone()[0] for name in defaults}
        leftovers = second.execute(
            "SELECT (SELECT count(*) FROM pg_prepared_statements), to_regclass('pg_temp.scratch') IS NOT NULL,"
            " (SELECT count(*) FROM pg_listening_channels()),"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())").fetchone()

    assert second_pid == first_pid, "the backend was not reused, so this test proves nothing about the reset"
    assert settings == defaults
    assert leftovers == (0, False, 0, 0)


def test_session_mode_client_waits_for_the_backend_a_leaving_client_frees(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_mode="session", pool_size=1, timeouts={"query_wait": 30})
    outcome: dict = {}

    def second_client():
        try:
            with connect(proxy, fresh_db) as second:
                outcome["pid"] = backend_pid(second)
        except psycopg.Error as e:
            outcome["error"] = e

    with connect(proxy, fresh_db) as first:
        first_pid = backend_pid(first)
        waiter = threading.Thread(target=second_client, daemon=True)
        waiter.start()
        waiter.join(1)
        still_waiting = waiter.is_alive()
    waiter.join(30)

    assert still_waiting, "the second client got a backend while the only one was owned by the first"
    assert outcome.get("error") is None
    assert outcome.get("pid") == first_pid


def test_session_mode_prepared_statements_and_cancel_work(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_mode="session", pool_size=2)
    with connect(proxy, fresh_db, prepare_threshold=0) as client:
        values = [client.execute("SELECT %s::int * 2", [i]).fetchone()[0] for i in range(20)]
        errors = []
        sleeper = threading.Thread(target=lambda: errors.append(run_and_catch(client, "SELECT pg_sleep(10)")))
        sleeper.start()
        wait_for_active(proxy, fresh_db)
        client.cancel_safe()
        sleeper.join(15)

    assert values == [i * 2 for i in range(20)]
    assert [getattr(e, "sqlstate", None) for e in errors] == ["57014"]


def run_and_catch(conn, sql: str) -> psycopg.Error | None:
    try:
        conn.execute(sql)
    except psycopg.Error as e:
        return e
    return None


def wait_for_active(proxy, dbname: str, timeout: float = 10) -> None:
    """Wait until the client's pg_sleep(10) is running, seen from another client."""
    with connect(proxy, dbname) as watcher:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)'"
                               " AND state = 'active'").fetchone()[0]:
                return
            time.sleep(0.02)
    raise AssertionError("the long query never started")
