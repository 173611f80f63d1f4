"""The statements collector: pg_stat_statements snapshots and their deltas, fingerprinted to join pgpilot.templates."""
from __future__ import annotations

import datetime as dt
import functools

import psycopg
from pglast import parser as pg_parser
from psycopg.rows import dict_row

from learning.collectors.common import CollectorResult, Target, error_text, write_rows

# Cumulative counters of pg_stat_statements that we difference between snapshots.
COUNTERS = ("calls", "total_exec_time", "rows", "shared_blks_hit", "shared_blks_read",
            "temp_blks_read", "temp_blks_written", "wal_records", "wal_bytes")
KEY = ("userid", "queryid", "toplevel")

SNAPSHOT_SQL = f"""
SELECT s.userid, s.queryid, s.toplevel, s.query, s.mean_exec_time, {", ".join("s." + c for c in COUNTERS)}
FROM pg_stat_statements s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

SNAPSHOT_COLUMNS = ("ts", "database", *KEY, "fingerprint", "mean_exec_time", *COUNTERS, "stats_reset")
DELTA_COLUMNS = ("ts", "prev_ts", "database", *KEY, "fingerprint", "basis", "mean_exec_time", *COUNTERS)


@functools.lru_cache(maxsize=10_000)  # pg_stat_statements.max is 5000 by default
def fingerprint(query: str) -> str | None:
    """pglast fingerprint of a statement text ($n and literal constants alike are ignored); None if unparsable."""
    try:
        return pg_parser.fingerprint(query)
    except Exception:  # texts pglast cannot parse (truncated, "<insufficient privilege>") simply do not join
        return None


def _preloaded(conn: psycopg.Connection) -> bool | None:
    """Is pg_stat_statements in shared_preload_libraries? None when this role may not read the setting."""
    try:
        value = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
    except psycopg.errors.InsufficientPrivilege:
        return None
    return "pg_stat_statements" in [lib.strip().strip('"') for lib in value.split(",")]


def ensure_extension(target: Target, result: CollectorResult) -> bool:
    """Make pg_stat_statements queryable in the target if we can; otherwise say why in a notice."""
    conn = target.conn
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone():
        return True
    if _preloaded(conn) is False:
        result.notice(f"{target.name}: pg_stat_statements is not in shared_preload_libraries; add it there and "
                      "restart PostgreSQL to collect statement statistics")
        return False
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    except psycopg.Error as e:
        result.notice(f"{target.name}: pg_stat_statements is not created and could not be ({error_text(e)}); "
                      "run CREATE EXTENSION pg_stat_statements as a superuser to collect statement statistics")
        return False
    return True


def _stats_reset(conn: psycopg.Connection) -> dt.datetime | None:
    try:
        return conn.execute("SELECT stats_reset FROM pg_stat_statements_info").fetchone()[0]
    except psycopg.errors.UndefinedTable:  # extension older than 1.9
        return None


def compute_deltas(current: list[dict], previous: list[dict], prev_stats_reset: dt.datetime | None,
                   stats_reset: dt.datetime | None) -> list[dict]:
    """Per entry, what the counters did since the previous snapshot; only entries that were called.

    A counter going down, or pg_stat_statements_info.stats_reset moving, means the counters restarted:
    the delta is then the current value (what accumulated since the restart).
    """
    whole_reset = stats_reset is not None and prev_stats_reset is not None and stats_reset != prev_stats_reset
    before = {tuple(r[k] for k in KEY): r for r in previous}
    deltas = []
    for row in current:
        old = before.get(tuple(row[k] for k in KEY))
        if old is None:
            basis, delta = "new", {c: row[c] for c in COUNTERS}
        elif whole_reset or any(row[c] < old[c] for c in COUNTERS):
            basis, delta = "reset", {c: row[c] for c in COUNTERS}
        else:
            basis, delta = "previous", {c: row[c] - old[c] for c in COUNTERS}
        if delta["calls"] <= 0:
            continue
        delta["mean_exec_time"] = delta["total_exec_time"] / delta["calls"]
        deltas.append({**{k: row[k] for k in KEY}, "fingerprint": row["fingerprint"], "basis": basis, **delta})
    return deltas


def _previous_snapshot(store: psycopg.Connection, database: str) -> tuple[dt.datetime | None, list[dict], dt.datetime | None]:
    prev_ts = store.execute("SELECT max(ts) FROM pgpilot.statement_snapshots WHERE database = %s",
                            (database,)).fetchone()[0]
    if prev_ts is None:
        return None, [], None
    with store.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(f"SELECT {', '.join(KEY + COUNTERS)}, stats_reset FROM pgpilot.statement_snapshots "
                           "WHERE database = %s AND ts = %s", (database, prev_ts)).fetchall()
    return prev_ts, rows, (rows[0]["stats_reset"] if rows else None)


def _record_texts(store: psycopg.Connection, database: str, ts: dt.datetime, rows: list[dict]) -> int:
    """Keep each entry's normalized text once; returns how many texts were new."""
    known = {r[0] for r in store.execute("SELECT queryid FROM pgpilot.statement_texts WHERE database = %s",
                                         (database,))}
    new, seen = {}, set()
    for r in rows:
        seen.add(r["queryid"])
        if r["queryid"] not in known:
            new[r["queryid"]] = (database, r["queryid"], r["fingerprint"], r["query"], ts, ts)
    written = write_rows(store, "statement_texts",
                         ("database", "queryid", "fingerprint", "query", "first_seen", "last_seen"), new.values())
    store.execute("UPDATE pgpilot.statement_texts SET last_seen = %s WHERE database = %s AND queryid = ANY(%s)",
                  (ts, database, list(seen - set(new))))
    return written


def collect(store: psycopg.Connection, target: Target, result: CollectorResult) -> None:
    """Snapshot pg_stat_statements for the target's database and store the deltas since the last snapshot."""
    if not ensure_extension(target, result):
        return
    conn = target.conn
    ts = target.now()
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(SNAPSHOT_SQL).fetchall()
    except psycopg.errors.ObjectNotInPrerequisiteState as e:
        result.notice(f"{target.name}: pg_stat_statements is created but not loaded ({error_text(e)}); add it to "
                      "shared_preload_libraries and restart PostgreSQL to collect statement statistics")
        return
    stats_reset = _stats_reset(conn)
    hidden = sum(1 for r in rows if r["queryid"] is None)
    if hidden:
        result.notice(f"{target.name}: {hidden} pg_stat_statements entries of other roles are hidden from this role; "
                      "grant it pg_read_all_stats to collect them")
    rows = [r for r in rows if r["queryid"] is not None]
    for r in rows:
        r["fingerprint"] = fingerprint(r["query"])

    prev_ts, previous, prev_stats_reset = _previous_snapshot(store, target.name)
    with store.transaction():
        result.wrote("statement_snapshots", write_rows(
            store, "statement_snapshots", SNAPSHOT_COLUMNS,
            ((ts, target.name, *(r[c] for c in SNAPSHOT_COLUMNS[2:-1]), stats_reset) for r in rows)))
        if prev_ts is not None:
            deltas = compute_deltas(rows, previous, prev_stats_reset, stats_reset)
            result.wrote("statement_deltas", write_rows(
                store, "statement_deltas", DELTA_COLUMNS,
                ((ts, prev_ts, target.name, *(d[c] for c in DELTA_COLUMNS[3:])) for d in deltas)))
        result.wrote("statement_texts", _record_texts(store, target.name, ts, rows))
