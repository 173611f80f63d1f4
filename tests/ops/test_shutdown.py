"""Graceful shutdown (SIGTERM): open transactions finish, everyone else is told 57P01; SIGINT closes at once."""
from __future__ import annotations

import re
import signal

import psycopg
import pytest

from tests.ops.conftest import start_pgbench
from tests.ops.helpers import metric_samples, pool_row, wait_until
from tests.proxy.helpers import connect
from tests.support.wire import RawConnection, error_fields, query

SLOW_TRANSACTION = """\
BEGIN;
SELECT pg_sleep(0.2);
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now());
END;
"""


def fatal_codes(messages) -> list[str]:
    return [error_fields(body)["C"] for kind, body in messages
            if kind == b"E" and error_fields(body).get("S") == "FATAL"]


def ready_client(proxy, dbname: str) -> RawConnection:
    raw = RawConnection(proxy.host, proxy.port)
    raw.start("postgres", dbname)
    return raw


def test_sigterm_under_pgbench_lets_open_transactions_finish_and_exits_0(bench_db, proxy_factory, tmp_path):
    script = tmp_path / "slow.sql"
    script.write_text(SLOW_TRANSACTION)
    proxy = proxy_factory(dbname=bench_db, pool_size=4, timeouts={"shutdown": 5})
    bench = start_pgbench(proxy, bench_db, "-T", "60", "-f", str(script))
    key = ("pgpilot_transactions_total", (("database", bench_db), ("user", "postgres")))
    wait_until(lambda: metric_samples(proxy).get(key, 0) > 20, what="pgbench to get going")

    proxy.signal(signal.SIGTERM)
    exit_status = proxy.proc.wait(30)
    out, err = bench.communicate(timeout=60)

    assert exit_status == 0, proxy.log()[-3000:]
    aborted_in = re.findall(r"client \d+ (?:script \d+ )?aborted in command (\d+)", err)
    assert len(aborted_in) == 16, err
    # Command 0 is BEGIN: every client was turned away between transactions, none in the middle of one.
    assert set(aborted_in) == {"0"}, err
    assert "terminating connection due to administrator command" in err


def test_sigterm_tells_idle_clients_at_once_and_lets_an_open_transaction_commit(pg, fresh_db, proxy_factory):
    pg.psql("CREATE TABLE t (x int)", dbname=fresh_db)
    proxy = proxy_factory(dbname=fresh_db, timeouts={"shutdown": 30})
    idle = ready_client(proxy, fresh_db)
    busy = connect(proxy, fresh_db, autocommit=False)
    busy.execute("INSERT INTO t VALUES (1)")

    proxy.signal(signal.SIGTERM)
    told = idle.read_until_closed()
    still_running = proxy.alive()
    busy.commit()
    exit_status = proxy.proc.wait(20)

    assert fatal_codes(told) == ["57P01"]
    assert still_running
    assert exit_status == 0
    assert pg.psql("SELECT count(*) FROM t", dbname=fresh_db).strip() == "1"
    busy.close()


def test_sigterm_turns_away_a_client_waiting_for_a_backend(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=1, timeouts={"shutdown": 30})
    holder = connect(proxy, fresh_db, autocommit=False)
    holder.execute("SELECT 1")
    waiter = ready_client(proxy, fresh_db)
    waiter.send(query("SELECT 2"))
    wait_until(lambda: pool_row(proxy, fresh_db)["cl_waiting"] == 1, what="the second client to wait")

    proxy.signal(signal.SIGTERM)
    told = waiter.read_until_closed()
    holder.commit()

    assert fatal_codes(told) == ["57P01"]
    assert not any(kind == b"D" for kind, _ in told)   # its query never ran
    assert proxy.proc.wait(20) == 0
    holder.close()


def test_transaction_still_open_at_the_deadline_gets_an_error_not_a_silent_reset(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, timeouts={"shutdown": 1})
    client = ready_client(proxy, fresh_db)
    client.send(query("BEGIN; SELECT 1"))
    assert client.read_until_ready()[-1] == (b"Z", b"T")

    proxy.signal(signal.SIGTERM)
    told = client.read_until_closed(timeout=20)

    assert fatal_codes(told) == ["57P01"]
    assert "administrator command" in error_fields(told[-1][1])["M"]
    assert proxy.proc.wait(20) == 0


def test_sigint_closes_at_once_without_waiting_for_transactions(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, timeouts={"shutdown": 600})
    client = ready_client(proxy, fresh_db)
    client.send(query("BEGIN"))
    client.read_until_ready()

    proxy.signal(signal.SIGINT)

    assert fatal_codes(client.read_until_closed(timeout=20)) == ["57P01"]
    assert proxy.proc.wait(20) == 0


def test_new_connections_are_refused_once_shutdown_began(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, timeouts={"shutdown": 30})
    busy = connect(proxy, fresh_db, autocommit=False)
    busy.execute("SELECT 1")

    proxy.signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in proxy.log(), what="the shutdown to begin")

    with pytest.raises(psycopg.OperationalError):
        connect(proxy, fresh_db)
    busy.commit()
    busy.close()
    assert proxy.proc.wait(20) == 0
