"""Session features that cannot move between backends pin the client in transaction mode, and work."""
from __future__ import annotations

import contextlib
import time

import psycopg
import pytest

from tests.proxy.helpers import backend_pid, connect

POOL_SIZE = 3  # the pinned client, a neighbour holding a backend, and a free one for a third client


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=POOL_SIZE, timeouts={"query_wait": 3})


@contextlib.contextmanager
def neighbour_in_transaction(proxy, dbname: str, pinned_pid: int):
    """Another client holding a backend in an open transaction; it must not get the pinned backend."""
    with connect(proxy, dbname, autocommit=False) as neighbour:
        assert backend_pid(neighbour) != pinned_pid, "the pinned backend was handed to another client"
        yield neighbour
        neighbour.rollback()


def test_listen_receives_notifications_sent_by_another_client(proxy, module_db):
    with connect(proxy, module_db) as listener, connect(proxy, module_db) as sender:
        listener.execute("LISTEN jobs")
        pid = backend_pid(listener)
        payloads = []
        for i in range(3):
            with neighbour_in_transaction(proxy, module_db, pid):
                sender.execute("SELECT pg_notify('jobs', %s)", [f"job {i}"])
                payloads += [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
                assert backend_pid(listener) == pid

    assert payloads == ["job 0", "job 1", "job 2"]


def test_temp_table_is_usable_across_transactions(proxy, module_db):
    with connect(proxy, module_db) as client:
        client.execute("CREATE TEMP TABLE scratch (n int)")
        pid = backend_pid(client)
        for i in range(3):
            with neighbour_in_transaction(proxy, module_db, pid):
                with client.transaction():
                    client.execute("INSERT INTO scratch VALUES (%s)", [i])
                assert backend_pid(client) == pid
        total = client.execute("SELECT sum(n) FROM scratch").fetchone()[0]

    assert total == 3


def test_session_advisory_lock_is_held_until_unlocked(proxy, module_db):
    with connect(proxy, module_db) as owner, connect(proxy, module_db) as rival:
        assert owner.execute("SELECT pg_advisory_lock(42)").fetchone()[0] == ""
        pid = backend_pid(owner)
        for _ in range(3):
            with neighbour_in_transaction(proxy, module_db, pid):
                rival_got_it = rival.execute("SELECT pg_try_advisory_lock(42)").fetchone()[0]
                assert not rival_got_it, "another client took a lock that is still held"
        released = owner.execute("SELECT pg_advisory_unlock(42)").fetchone()[0]
        rival_after = rival.execute("SELECT pg_try_advisory_lock(42)").fetchone()[0]
        rival.execute("SELECT pg_advisory_unlock_all()")

    assert released is True
    assert rival_after is True


def test_with_hold_cursor_fetches_across_transactions(proxy, module_db):
    with connect(proxy, module_db) as client:
        client.execute("DECLARE numbers CURSOR WITH HOLD FOR SELECT generate_series(1, 9)")
        pid = backend_pid(client)
        batches = []
        for _ in range(3):
            with neighbour_in_transaction(proxy, module_db, pid):
                batches.append([r[0] for r in client.execute("FETCH 3 FROM numbers")])
        client.execute("CLOSE numbers")

    assert batches == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_sql_prepare_is_executable_across_transactions(proxy, module_db):
    with connect(proxy, module_db) as client:
        client.execute("PREPARE double_it (int) AS SELECT $1 * 2")
        pid = backend_pid(client)
        results = []
        for i in range(3):
            with neighbour_in_transaction(proxy, module_db, pid):
                results.append(client.execute(f"EXECUTE double_it({i})").fetchone()[0])
        client.execute("DEALLOCATE double_it")

    assert results == [0, 2, 4]


def test_pinned_backend_is_clean_for_the_next_client(proxy, module_db, pg):
    with connect(proxy, module_db) as client:
        client.execute("LISTEN jobs")
        client.execute("CREATE TEMP TABLE scratch (n int)")
        client.execute("SELECT pg_advisory_lock(7)")
        client.execute("PREPARE leftover AS SELECT 1")
    with connect(proxy, module_db) as newcomer:
        for _ in range(POOL_SIZE):  # whichever backend it lands on
            with newcomer.transaction():
                channels = newcomer.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0]
                statements = newcomer.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
                temp = newcomer.execute("SELECT to_regclass('pg_temp.scratch') IS NOT NULL").fetchone()[0]
                assert (channels, statements, temp) == (0, 0, False)
    assert advisory_locks_drain(pg, module_db) == 0


def advisory_locks_drain(pg, dbname: str, timeout: float = 5) -> int:
    """Advisory locks held in `dbname`, waited on briefly: a closing backend releases them as it exits."""
    with psycopg.connect(pg.dsn_for(dbname), autocommit=True) as direct:
        deadline = time.monotonic() + timeout
        while True:
            locks = direct.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]
            if locks == 0 or time.monotonic() > deadline:
                return locks
            time.sleep(0.05)
