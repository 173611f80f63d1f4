"""pgbench through a logging proxy: the statements pgbench sends, its summary, and the query log's counters.

Shared by the query log acceptance tests and `bench.querylog_overhead`.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass

from pglast.parser import fingerprint
from prometheus_client.parser import text_string_to_metric_families

# pgbench's built-in TPC-B-like script, one transaction: (statement with its variables bound, kind, rows).
# pgbench sends BEGIN and END in the chosen protocol too, so a transaction is 7 statements in every protocol.
TPCB = (
    ("BEGIN", "transaction", None),
    ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1", "update", 1),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "select", 1),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 1", "update", 1),
    ("UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = 1", "update", 1),
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, CURRENT_TIMESTAMP)", "insert", 1),
    ("END", "transaction", None),
)
SELECT_ONLY = (("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "select", 1),)

# Before a built-in script runs, pgbench reads the scale and pgbench_accounts' partitioning, once per run, on
# one connection, in the simple protocol (GetTableInfo in pgbench.c).
SETUP = (
    ("select count(*) from pgbench_branches", "select", 1),
    ("select o.n, p.partstrat, pg_catalog.count(i.inhparent) from pg_catalog.pg_class as c "
     "join pg_catalog.pg_namespace as n on (n.oid = c.relnamespace) "
     "cross join lateral (select pg_catalog.array_position(pg_catalog.current_schemas(true), n.nspname)) as o(n) "
     "left join pg_catalog.pg_partitioned_table as p on (p.partrelid = c.oid) "
     "left join pg_catalog.pg_inherits as i on (c.oid = i.inhparent) "
     "where c.relname = 'pgbench_accounts' and o.n is not null group by 1, 2 order by 1 asc limit 1", "select", 1),
)


def expected_events(script, transactions: int, protocol: str) -> Counter:
    """The log rows a pgbench run must leave, as a Counter of (fingerprint, kind, protocol, rows, sqlstate)."""
    wire = "simple" if protocol == "simple" else "extended"
    events = Counter({(fingerprint(sql), kind, "simple", rows, None): 1 for sql, kind, rows in SETUP})
    for sql, kind, rows in script:
        events[(fingerprint(sql), kind, wire, rows, None)] += transactions
    return events


@dataclass
class PgbenchResult:
    returncode: int
    processed: int | None
    failed: int | None
    tps: float | None
    stdout: str
    stderr: str

    def report(self) -> str:
        return f"pgbench exit {self.returncode}\n{self.stdout}\n{self.stderr}"


def pgbench_command(host: str, port: int, dbname: str, *args: str) -> list[str]:
    return ["pgbench", "-n", "-h", host, "-p", str(port), "-U", "postgres", *args, dbname]


def client_env(application_name: str) -> dict[str, str]:
    """The environment for a libpq client with its own application_name, which tells its log rows apart."""
    return {**os.environ, "PGAPPNAME": application_name}


def parse_pgbench(returncode: int, stdout: str, stderr: str) -> PgbenchResult:
    def number(pattern: str, cast):
        m = re.search(pattern, stdout)
        return cast(m.group(1)) if m else None

    return PgbenchResult(returncode, number(r"number of transactions actually processed: (\d+)", int),
                         number(r"number of failed transactions: (\d+)", int),
                         number(r"tps = ([\d.]+) \(without initial connection time\)", float), stdout, stderr)


def run_pgbench(host: str, port: int, dbname: str, application_name: str, *args: str,
                timeout: float = 300) -> PgbenchResult:
    out = subprocess.run(pgbench_command(host, port, dbname, *args), env=client_env(application_name),
                         capture_output=True, text=True, timeout=timeout)
    return parse_pgbench(out.returncode, out.stdout, out.stderr)


def querylog_metrics(proxy) -> dict[str, float]:
    """The proxy's pgpilot_querylog_* metrics from /metrics, by name without that prefix (rows_dropped, ...)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("pgpilot_querylog_"):
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    values[family.name.removeprefix("pgpilot_querylog_")] = sample.value
    return values


def log_settled(metrics: dict[str, float]) -> bool:
    """Every event submitted so far is in the store or counted as dropped; nothing waits in queue or spool."""
    return (metrics["queued_events"] == 0 and metrics["spool_bytes"] == 0 and metrics["store_connected"] == 1
            and metrics["events_submitted"] == metrics["rows_written"] + metrics["rows_dropped"])


def wait_for_log(proxy, count_rows, timeout: float = 120.0) -> dict[str, float]:
    """Poll until the writer has settled every event and count_rows() (a count in the store) stops growing.

    Returns the last metrics read. Raises AssertionError with the metrics and the proxy log at the deadline.
    """
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        metrics = querylog_metrics(proxy)
        count = count_rows()
        if log_settled(metrics) and count == previous:
            return metrics
        previous = count
        if time.monotonic() > deadline:
            raise AssertionError(f"the query log did not settle: {count} rows, metrics {metrics}\n"
                                 f"proxy log:\n{proxy.log()[-3000:]}")
        time.sleep(0.25)
