"""pgbench through a transaction pool of 4 with 16 clients, in all three query protocols; the books must balance."""
from __future__ import annotations

import re
import subprocess
import uuid

import pytest

CLIENTS = 16
TRANSACTIONS = 20  # per client
PROTOCOLS = ["simple", "extended", "prepared"]


@pytest.fixture(scope="module")
def bench_db(pg):
    """A database initialised by pgbench -i (scale 1) directly against Postgres, shared by this module."""
    name = "t_bench_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE DATABASE {name}")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, name],
                   check=True, capture_output=True, text=True)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="module")
def proxy(bench_db, module_proxy_factory):
    return module_proxy_factory(bench_db, pool_size=4, timeouts={"query_wait": 10})


def pgbench(proxy, dbname: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["pgbench", "-n", "-c", str(CLIENTS), "-j", "2", "-t", str(TRANSACTIONS),
         "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", *args, dbname],
        capture_output=True, text=True, timeout=120)


def processed(out: subprocess.CompletedProcess) -> int:
    match = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out.stdout)
    assert match, f"no summary from pgbench:\n{out.stdout}\n{out.stderr}"
    return int(match.group(1))


def failed(out: subprocess.CompletedProcess) -> int:
    match = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return int(match.group(1)) if match else 0


def books(pg, dbname: str) -> dict[str, int]:
    row = pg.psql(
        "SELECT (SELECT count(*) FROM pgbench_history), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
        " (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
        " (SELECT sum(bbalance) FROM pgbench_branches)", dbname=dbname).strip().split("|")
    return dict(zip(["history_rows", "history_delta", "accounts", "tellers", "branches"], map(int, row)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pgbench_tpcb_through_transaction_pool_balances_the_books(protocol, bench_db, pg, proxy):
    before = books(pg, bench_db)

    out = pgbench(proxy, bench_db, "-M", protocol)

    after = books(pg, bench_db)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\nproxy log:\n{proxy.log()[-3000:]}"
    assert failed(out) == 0
    assert processed(out) == CLIENTS * TRANSACTIONS
    assert after["history_rows"] - before["history_rows"] == CLIENTS * TRANSACTIONS
    assert after["accounts"] == after["tellers"] == after["branches"] == after["history_delta"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pgbench_select_only_through_transaction_pool_completes(protocol, bench_db, pg, proxy):
    before = books(pg, bench_db)

    out = pgbench(proxy, bench_db, "-S", "-M", protocol)

    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\nproxy log:\n{proxy.log()[-3000:]}"
    assert failed(out) == 0
    assert processed(out) == CLIENTS * TRANSACTIONS
    assert books(pg, bench_db) == before
