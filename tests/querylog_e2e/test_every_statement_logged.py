"""Every statement pgbench and psql send through a logging proxy lands in the log store exactly once, as it ran.

One proxy for the module (transaction pooling, pool of 4) logs into a store database of its own
(`query_log.dsn`), apart from the pgbench database. Each pgbench run has its own application_name, so its rows
are told from the others'; they are compared as a whole with what pgbench reported: every statement of every
transaction, plus pgbench's two setup queries, each with the fingerprint of its text (pglast), its kind, its
row count and its SQLSTATE.
"""
from __future__ import annotations

import subprocess
import uuid
from collections import Counter

import pytest
from pglast.parser import fingerprint

from tests.querylog_e2e.conftest import count_events, create_database, fetch
from tests.querylog_e2e.pgbench_log import (
    SELECT_ONLY, TPCB, client_env, expected_events, run_pgbench, wait_for_log,
)
from tests.support.proxy import ProxyProcess, upstream_entry

PROTOCOLS = ["simple", "extended", "prepared"]
CLIENTS = 4
TRANSACTIONS = 25   # per client


@pytest.fixture(scope="module")
def store_dsn(pg):
    name = create_database(pg)
    yield pg.dsn_for(name)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="module")
def psql_db(pg):
    name = create_database(pg)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="module")
def proxy(pg, bench_db, psql_db, store_dsn, tmp_path_factory):
    proxy = ProxyProcess({
        "databases": {bench_db: upstream_entry(pg, bench_db), psql_db: upstream_entry(pg, psql_db)},
        "pool_size": 4,
        "query_log": {"enabled": True, "dsn": store_dsn, "flush_interval": 0.05,
                      "spool_dir": str(tmp_path_factory.mktemp("spool"))},
    }).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def logged_run(proxy, bench_db, store_dsn):
    """logged_run(script, protocol) -> (pgbench's result, the log rows of that run); each run happens once."""
    runs = {}

    def run(script: str, protocol: str):
        if (script, protocol) not in runs:
            app = f"pgbench-{script}-{protocol}"
            args = ["-M", protocol, "-c", str(CLIENTS), "-j", "2", "-t", str(TRANSACTIONS)]
            if script == "select":
                args.append("-S")
            result = run_pgbench(proxy.host, proxy.port, bench_db, app, *args)
            assert result.returncode == 0 and result.failed == 0, result.report() + proxy.log()[-3000:]
            wait_for_log(proxy, lambda: count_events(store_dsn, bench_db, app))
            rows = fetch(store_dsn, "SELECT fingerprint, kind, protocol, rows, sqlstate, xact_id "
                                    "FROM pgpilot.query_events WHERE database = %s AND application_name = %s",
                         bench_db, app)
            runs[(script, protocol)] = result, rows
        return runs[(script, protocol)]

    return run


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_tpcb_statement_is_logged_once_with_its_fingerprint_kind_and_rows(protocol, logged_run):
    result, rows = logged_run("tpcb", protocol)

    assert result.processed == CLIENTS * TRANSACTIONS
    assert len(rows) == 7 * result.processed + 2
    assert Counter(r[:5] for r in rows) == expected_events(TPCB, result.processed, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_seven_statements_of_a_tpcb_transaction_share_one_xact_id(protocol, logged_run):
    result, rows = logged_run("tpcb", protocol)
    script = {fingerprint(sql) for sql, _, _ in TPCB}

    per_xact = Counter(r[5] for r in rows if r[0] in script)

    assert len(per_xact) == result.processed
    assert set(per_xact.values()) == {7}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_select_only_statement_is_logged_once(protocol, logged_run):
    result, rows = logged_run("select", protocol)

    assert result.processed == CLIENTS * TRANSACTIONS
    assert len(rows) == result.processed + 2
    assert Counter(r[:5] for r in rows) == expected_events(SELECT_ONLY, result.processed, protocol)


PSQL_SCRIPT = r"""
CREATE TABLE ledger (id int PRIMARY KEY, note text);
INSERT INTO ledger VALUES (1, 'a') \; INSERT INTO ledger VALUES (2, 'b') \; SELECT count(*) FROM ledger;
SELECT 1 / 0;
INSERT INTO ledger VALUES (3, 'c') \; SELECT id / 0 FROM ledger \; SELECT 'never run';
COPY ledger FROM STDIN;
10	x
11	y
12	z
\.
COPY ledger TO STDOUT;
SELECT id FROM ledger ORDER BY id;
"""


def test_a_psql_session_is_logged_statement_by_statement(proxy, psql_db, store_dsn, tmp_path):
    """Each statement of a multi-statement query is a row; an error ends its query (what follows never ran,
    and the INSERT before it, rolled back with the implicit transaction, still ran); COPY counts its rows."""
    script = tmp_path / "session.sql"
    script.write_text(PSQL_SCRIPT)
    app = "psql-" + uuid.uuid4().hex[:6]

    out = subprocess.run(["psql", "-X", "-q", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres",
                          "-d", psql_db, "-f", str(script)],
                         env=client_env(app), capture_output=True, text=True, timeout=60)
    wait_for_log(proxy, lambda: count_events(store_dsn, psql_db, app))

    assert out.returncode == 0, out.stderr
    assert out.stderr.count("ERROR:  division by zero") == 2
    rows = fetch(store_dsn, "SELECT fingerprint, kind, protocol, rows, sqlstate FROM pgpilot.query_events "
                            "WHERE database = %s AND application_name = %s ORDER BY ts", psql_db, app)
    assert rows == [(fingerprint(sql), kind, "simple", nrows, sqlstate) for sql, kind, nrows, sqlstate in [
        ("CREATE TABLE ledger (id int PRIMARY KEY, note text)", "ddl", None, None),
        ("INSERT INTO ledger VALUES (1, 'a')", "insert", 1, None),
        ("INSERT INTO ledger VALUES (2, 'b')", "insert", 1, None),
        ("SELECT count(*) FROM ledger", "select", 1, None),
        ("SELECT 1 / 0", "select", None, "22012"),
        ("INSERT INTO ledger VALUES (3, 'c')", "insert", 1, None),
        ("SELECT id / 0 FROM ledger", "select", None, "22012"),
        ("COPY ledger FROM STDIN", "copy", 3, None),
        ("COPY ledger TO STDOUT", "copy", 5, None),
        ("SELECT id FROM ledger ORDER BY id", "select", 5, None),
    ]]
