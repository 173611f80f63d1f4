"""Run a workload against a database, time every statement and log it into pgpilot.query_events as the proxy would.

A workload is any iterable of `Statement`s (bench.workloads.synthetic builds them; `pgbench_script()` turns a
pgbench-style script into them). `Recorder(target_dsn, store_dsn).run(statements)` executes each statement
on one connection per application name, measures it at the client, and COPYs one row per statement into the
log store with the fingerprint, normalized text, kind and tables that the proxy's analyzer gives. With
`store_dsn=None` it only executes, which is what to do once `target_dsn` is a pgpilot proxy that logs itself.

With a `simulator` instead of a target, nothing is executed: the simulator says how long each statement took
and what it returned, which is how large logs (and deterministic test logs) are made.

Statements carry a virtual timestamp (`ts`): a workload can describe a day of traffic that runs in minutes,
and the log shows the day. Anomaly labels (`Statement.label`) are written apart from the log, to
pgpilot_eval.labels (xact_id, fingerprint, label), so that no model can read them as a feature.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlparse

import psycopg
from psycopg import pq

from proxy.logstore import ensure_schema_sync

log = logging.getLogger("pgpilot.bench.recorder")

try:  # the proxy's own statement analysis, so the log is byte-for-byte what the proxy would write
    from proxy.analysis import analyze as _proxy_analyze
    from proxy.analysis import extract_literals as _proxy_literals
except ImportError:  # pragma: no cover - before the proxy's analyzer existed
    _proxy_analyze = None
    _proxy_literals = None

EVENT_COLUMNS = ("ts", "duration_us", "wait_us", "fingerprint", "kind", "tables_read", "tables_written", "rows",
                 "bytes_out", "sqlstate", "database", "username", "application_name", "client_addr",
                 "backend_pid", "xact_id", "in_transaction", "protocol", "cache_outcome", "rewrite",
                 "anomaly_score", "proxy_id", "parameters")
LABELS_DDL = """
CREATE SCHEMA IF NOT EXISTS pgpilot_eval;
CREATE TABLE IF NOT EXISTS pgpilot_eval.labels (
    xact_id     bigint NOT NULL,
    fingerprint text   NOT NULL,
    label       text   NOT NULL,
    PRIMARY KEY (xact_id, fingerprint)
);
"""
_SAMPLED_ROWS = 500  # rows whose sizes are measured exactly; bytes of larger results are extrapolated


@dataclass
class Statement:
    """One message a client sends: SQL text, or a $n template with parameters (extended protocol)."""

    sql: str
    params: list[str | None] | None = None
    ts: float | None = None                # virtual start time (epoch seconds); None: the wall clock
    app: str = "app"
    client_addr: str | None = "127.0.0.1"
    username: str | None = None
    settings: dict[str, str] | None = None  # session settings for this statement only, not logged
    label: str | None = None                # anomaly class, for evaluation only


@dataclass
class Analysis:
    fingerprint: str
    normalized: str
    kind: str
    tables_read: tuple[str, ...]
    tables_written: tuple[str, ...]
    literals: list[str]


@functools.lru_cache(maxsize=50_000)
def analyze_text(sql: str) -> tuple[Analysis, ...]:
    """One Analysis per statement of a text (fingerprint, normalized SQL, kind, tables, literal values)."""
    if _proxy_analyze is not None:
        info = _proxy_analyze(sql)
        values = _proxy_literals(sql)
        out = []
        pos = 0
        for s in info.statements:
            out.append(Analysis(s.fingerprint, s.normalized, s.kind, tuple(s.tables_read), tuple(s.tables_written),
                                values[pos:pos + s.literal_count]))
            pos += s.literal_count
        return tuple(out)
    from pglast import parser, split

    from proxy.features import normalize, statement_kind, statement_tables
    out = []
    for part in split(sql) if ";" in sql else [sql]:
        normalized, values = normalize(part)
        try:
            fp = parser.fingerprint(part)
        except Exception:
            fp = hashlib.sha1(normalized.encode()).hexdigest()[:16]
        read, written = statement_tables(part)
        out.append(Analysis(fp, normalized, statement_kind(part), read, written, list(values)))
    return tuple(out)


@dataclass
class RecordSummary:
    statements: int = 0
    events: int = 0
    errors: int = 0
    labelled: int = 0
    seconds: float = 0.0
    by_label: dict[str, int] = field(default_factory=dict)


class Recorder:
    """Executes statements against target_dsn and, when store_dsn is given, logs them like the proxy."""

    def __init__(self, target_dsn: str | None, store_dsn: str | None = None, *, log_parameters: bool = True,
                 proxy_id: str = "recorder", batch_size: int = 5000, progress_every: float = 10.0,
                 simulator=None, database: str | None = None):
        """simulator(statement, part_index, text) -> (duration_us, rows, bytes_out, sqlstate): log without executing."""
        if target_dsn is None and simulator is None:
            raise ValueError("a Recorder needs a target DSN to execute on, or a simulator")
        self.target_dsn = target_dsn
        self.store_dsn = store_dsn
        self.simulator = simulator
        self.log_parameters = log_parameters
        self.proxy_id = proxy_id
        self.batch_size = batch_size
        self.progress_every = progress_every
        self.database = database or (urlparse(target_dsn).path.lstrip("/") if target_dsn else "") or "postgres"
        self._conns: dict[str, psycopg.Connection] = {}
        self._events: list[tuple] = []
        self._labels: list[tuple] = []
        self._templates: dict[str, list] = {}
        self._days: set[dt.date] = set()
        self._store: psycopg.Connection | None = None
        self._xact = 0
        self._known_days: set[dt.date] = set()

    # -- connections

    def _conn(self, app: str) -> psycopg.Connection:
        conn = self._conns.get(app)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.target_dsn, autocommit=True, application_name=app[:63])
            self._conns[app] = conn
        return conn

    def close(self) -> None:
        self.flush()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- execution

    def run(self, statements: Iterable[Statement], limit: int | None = None) -> RecordSummary:
        """Execute every statement (at most `limit`), logging as it goes; returns counts."""
        summary = RecordSummary()
        started = time.monotonic()
        last_report = started
        for st in statements:
            if limit is not None and summary.statements >= limit:
                break
            self.execute(st, summary)
            now = time.monotonic()
            if now - last_report >= self.progress_every:
                last_report = now
                log.info("recorded %d statements (%d events, %d errors) in %.0fs", summary.statements,
                         summary.events, summary.errors, now - started)
            if len(self._events) >= self.batch_size:
                self.flush()
        self.flush()
        summary.seconds = time.monotonic() - started
        return summary

    def execute(self, st: Statement, summary: RecordSummary | None = None) -> None:
        summary = summary if summary is not None else RecordSummary()
        simulated = self.simulator is not None
        pg = None
        if not simulated:
            conn = self._conn(st.app)
            pg = conn.pgconn
            username = st.username or conn.info.user
            if st.settings:
                for k, v in st.settings.items():
                    pg.exec_(f"SET {k} = {v}".encode())
        else:
            username = st.username or "app"
        parts = [st.sql] if st.params is not None else _split_statements(st.sql)
        analyses = analyze_text(st.sql)
        if len(analyses) != len(parts):  # the analyzer and the splitter disagree: log the text as one statement
            parts = [st.sql]
            analyses = analyses[:1]
        start_wall = time.time() if st.ts is None else st.ts
        elapsed = 0.0
        if simulated or pg.transaction_status == pq.TransactionStatus.IDLE:
            self._xact += 1
        for i, (text, a) in enumerate(zip(parts, analyses)):
            if simulated:
                duration_us, rows, nbytes, sqlstate = self.simulator(st, i, text)
                in_tx, backend_pid = False, 0
            else:
                t0 = time.perf_counter_ns()
                if st.params is not None:
                    res = pg.exec_params(text.encode(),
                                         [None if p is None else str(p).encode() for p in st.params])
                else:
                    res = pg.exec_(text.encode())
                duration_us = max(1, (time.perf_counter_ns() - t0) // 1000)
                rows, nbytes, sqlstate = _result_facts(res)
                in_tx = pg.transaction_status != pq.TransactionStatus.IDLE
                backend_pid = pg.backend_pid
            ts = start_wall + elapsed
            elapsed += duration_us / 1e6
            summary.events += 1
            summary.errors += sqlstate is not None
            if self.store_dsn is None:
                continue
            params = None
            if self.log_parameters:
                params = [None if p is None else str(p) for p in st.params] if st.params is not None else a.literals
            when = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
            self._events.append((
                when, int(duration_us), 0, a.fingerprint, a.kind, list(a.tables_read), list(a.tables_written), rows,
                int(nbytes), sqlstate, self.database, username, st.app, st.client_addr, backend_pid, self._xact,
                in_tx, "extended" if st.params is not None else "simple", None, None, None, self.proxy_id, params))
            self._days.add(when.date())
            t = self._templates.get(a.fingerprint)
            if t is None:
                sample = st.sql if (self.log_parameters and st.params is None and len(parts) == 1) else None
                self._templates[a.fingerprint] = [a.normalized, a.kind, list(a.tables_read), list(a.tables_written),
                                                  when, when, sample]
            else:
                t[4] = min(t[4], when)
                t[5] = max(t[5], when)
            # A stacked payload (`...; DROP TABLE x`) is the last statement of its message: only it is labelled.
            if st.label and i == len(parts) - 1:
                self._labels.append((self._xact, a.fingerprint, st.label))
                summary.labelled += 1
                summary.by_label[st.label] = summary.by_label.get(st.label, 0) + 1
        if st.settings and not simulated:
            for k in st.settings:
                pg.exec_(f"RESET {k}".encode())
        summary.statements += 1

    # -- the log store

    def _store_conn(self) -> psycopg.Connection:
        if self._store is None:
            self._store = psycopg.connect(self.store_dsn, autocommit=True)
            ensure_schema_sync(self._store)
            self._store.execute(LABELS_DDL)
        return self._store

    def flush(self) -> None:
        """Write buffered events, templates and labels to the log store."""
        if self.store_dsn is None or not (self._events or self._labels or self._templates):
            return
        store = self._store_conn()
        missing = self._days - self._known_days
        if missing:
            ensure_schema_sync(store, days=range(0, 1), extra_days=sorted(missing))
            self._known_days |= missing
        with store.transaction():
            with store.cursor() as cur:
                with cur.copy(f"COPY pgpilot.query_event_rows ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                    for row in self._events:
                        copy.write_row(row)
                cur.executemany(
                    "INSERT INTO pgpilot.templates (fingerprint, normalized_sql, kind, tables_read, tables_written,"
                    " first_seen, last_seen, sample_sql) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (fingerprint) DO UPDATE SET"
                    " first_seen = least(pgpilot.templates.first_seen, excluded.first_seen),"
                    " last_seen = greatest(pgpilot.templates.last_seen, excluded.last_seen),"
                    " sample_sql = coalesce(pgpilot.templates.sample_sql, excluded.sample_sql)",
                    [(fp, *v) for fp, v in self._templates.items()])
                if self._labels:
                    cur.executemany("INSERT INTO pgpilot_eval.labels VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                    self._labels)
        self._events.clear()
        self._labels.clear()
        self._templates.clear()


def _split_statements(sql: str) -> list[str]:
    if ";" not in sql.rstrip().rstrip(";"):
        return [sql]
    from pglast import split
    try:
        return list(split(sql, with_parser=False))
    except Exception:
        return [sql]


def _result_facts(res) -> tuple[int | None, int, str | None]:
    """(rows, bytes sent to the client, SQLSTATE) of one result, bytes counted as the wire protocol would."""
    status = res.status
    if status == pq.ExecStatus.FATAL_ERROR:
        code = res.error_field(pq.DiagnosticField.SQLSTATE)
        message = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
        return None, 6 + len(message) + 30, code.decode() if code else "XX000"
    tag = res.command_status or b""
    nbytes = 5 + len(tag) + 1  # CommandComplete
    if status == pq.ExecStatus.TUPLES_OK:
        n, nf = res.ntuples, res.nfields
        nbytes += 7 + sum(len(res.fname(c) or b"") + 19 for c in range(nf))  # RowDescription
        sample = min(n, _SAMPLED_ROWS)
        sized = 0
        for r in range(sample):
            sized += 7 + 4 * nf + sum(len(res.get_value(r, c) or b"") for c in range(nf))
        if sample:
            nbytes += int(sized * (n / sample))
        return n, nbytes, None
    try:
        rows = int(tag.split()[-1]) if tag and tag.split()[-1].isdigit() else 0
    except ValueError:
        rows = 0
    return rows, nbytes, None


# ---------------------------------------------------------------------------------------------
# pgbench-style scripts

TPCB_SCRIPT = r"""
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""
SELECT_ONLY_SCRIPT = r"""
\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
"""
_SET_RE = re.compile(r"^\\set\s+(\w+)\s+(.+)$")
_VAR_RE = re.compile(r":(\w+)")


def _eval_expr(expr: str, variables: dict[str, int], rng: random.Random) -> int:
    """pgbench's \\set expressions restricted to integer arithmetic and random(lo, hi)."""
    import ast

    text = _VAR_RE.sub(lambda m: str(variables[m.group(1)]), expr)
    tree = ast.parse(text, mode="eval")

    def ev(node) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: a // b, ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
            return ops[type(node.op)]()
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "random":
            lo, hi = (int(ev(a)) for a in node.args)
            return rng.randint(lo, hi)
        raise ValueError(f"unsupported pgbench expression: {expr!r}")

    return int(ev(tree))


def pgbench_script(script: str, *, scale: int = 1, transactions: int, rng: random.Random | None = None,
                   app: str = "pgbench", client_addr: str = "127.0.0.1", start_ts: float | None = None,
                   tps: float = 50.0) -> Iterator[Statement]:
    """A pgbench script as Statements, variables bound as parameters (pgbench -M extended); virtual clock at tps."""
    rng = rng or random.Random(0)
    lines = [ln.strip() for ln in script.strip().splitlines() if ln.strip() and not ln.strip().startswith("--")]
    ts = start_ts
    for _ in range(transactions):
        variables = {"scale": scale}
        for line in lines:
            m = _SET_RE.match(line)
            if m:
                variables[m.group(1)] = _eval_expr(m.group(2), variables, rng)
                continue
            sql = line.rstrip(";")
            if sql.upper() == "END":
                sql = "COMMIT"
            names: list[str] = []

            def placeholder(match: re.Match) -> str:
                names.append(match.group(1))
                return f"${len(names)}"
            text = _VAR_RE.sub(placeholder, sql)
            params = [str(variables[n]) for n in names]
            yield Statement(text, params if names or sql.upper() not in ("BEGIN", "COMMIT") else None,
                            ts=ts, app=app, client_addr=client_addr)
            if ts is not None:
                ts += 0.0005
        if ts is not None:
            ts += rng.expovariate(tps) if tps > 0 else 0.0
    return


def virtual_start(events: int, rate_per_s: float, now: float | None = None) -> float:
    """A start for `events` at `rate_per_s` that ends before now, at midnight UTC: recent enough for the
    learner's window, and the same time of day whenever it runs (the daily curve makes a stream depend on it)."""
    now = time.time() if now is None else now
    return math.floor((now - events / rate_per_s) / 86400.0 - 1.0) * 86400.0
