"""Run the collectors once over every monitored database, record each run, prune old snapshots, summarize."""
from __future__ import annotations

import logging
import time
from typing import Callable

import psycopg

from learning.collectors import performance, plans, resources, statements
from learning.collectors.common import CollectorResult, Target, connect, ensure_schema, error_text, write_rows

log = logging.getLogger("pgpilot.collectors")

# In this order: plans may count calls from the statements snapshot taken just before.
COLLECTORS = ("statements", "performance", "resources", "plans")

# Raw pg_stat_statements snapshots are the bulk of the store (every entry, every run) and only serve the next
# delta and audits of it: the deltas carry the history, so raw snapshots are kept at most this long.
RAW_STATEMENT_RETENTION_DAYS = 7

# Tables pruned by age, with the column that dates their rows.
RETAINED = {"collector_runs": "ts", "statement_snapshots": "ts", "statement_deltas": "ts",
            "statement_texts": "last_seen", "database_stats": "ts", "checkpointer_stats": "ts",
            "activity_stats": "ts", "host_stats": "ts", "table_stats": "ts", "index_stats": "ts", "plans": "ts"}


def run_collectors(store_dsn: str, target_dsns: dict[str, str] | None = None, *, plans_min_calls: int = 20,
                   only: set[str] | None = None, retention_days: int | None = 30) -> dict:
    """Take one snapshot per collector and monitored database, written to pgpilot.* in the log store.

    store_dsn: the log-store database; target_dsns: monitored database name -> DSN (default: the log-store
    database itself); only: a subset of COLLECTORS; retention_days: snapshots older than this are deleted
    (None keeps everything). Returns {collector: {"rows", "tables", "notices", "seconds"}}. A problem with one
    database or collector becomes a notice in the summary and the log, not an exception; only an unusable
    log store raises.
    """
    selected = [c for c in COLLECTORS if only is None or c in only]
    unknown = set(only or ()) - set(COLLECTORS)
    if unknown:
        raise ValueError(f"unknown collectors: {', '.join(sorted(unknown))} (known: {', '.join(COLLECTORS)})")
    summary = {c: {"rows": 0, "tables": {}, "notices": [], "seconds": 0.0} for c in selected}
    with connect(store_dsn) as store:
        ensure_schema(store)
        if target_dsns is None:
            target_dsns = {store.info.dbname: store_dsn}
        targets = []
        for name, dsn in target_dsns.items():
            try:
                targets.append(Target(name, connect(dsn)))
            except psycopg.Error as e:
                for c in selected:
                    summary[c]["notices"].append(f"{name}: cannot connect: {error_text(e)}")
                log.warning("%s: cannot connect: %s", name, error_text(e))
        try:
            for collector in selected:
                run = _collector_function(collector, plans_min_calls, only_target=len(target_dsns) == 1)
                for target in targets:
                    _run_one(store, collector, run, target, summary[collector])
            if retention_days is not None:
                prune(store, retention_days)
        finally:
            for target in targets:
                target.conn.close()
    return summary


def _collector_function(name: str, plans_min_calls: int, only_target: bool) -> Callable:
    if name == "plans":
        return lambda store, target, result: plans.collect(store, target, result, min_calls=plans_min_calls,
                                                           only_target=only_target)
    return {"statements": statements.collect, "performance": performance.collect,
            "resources": resources.collect}[name]


def _run_one(store: psycopg.Connection, collector: str, run: Callable, target: Target, summary: dict) -> None:
    started = time.monotonic()
    result = CollectorResult()
    try:
        run(store, target, result)
    except Exception as e:  # one failing collector must not stop the others or the learner
        log.exception("%s collector failed on %s", collector, target.name)
        result.notice(f"{target.name}: {collector} collector failed: {type(e).__name__}: {error_text(e)}")
    seconds = time.monotonic() - started
    log.info("%s on %s: %d rows in %.2fs%s", collector, target.name, result.total_rows, seconds,
             f", {len(result.notices)} notices" if result.notices else "")
    summary["rows"] += result.total_rows
    summary["seconds"] += seconds
    summary["notices"].extend(result.notices)
    for table, count in result.rows.items():
        summary["tables"][table] = summary["tables"].get(table, 0) + count
    finished = store.execute("SELECT clock_timestamp()").fetchone()[0]
    write_rows(store, "collector_runs", ("ts", "collector", "database", "rows_written", "seconds", "notices"),
               [(finished, collector, target.name, result.total_rows, seconds, result.notices)])


def prune(store: psycopg.Connection, retention_days: int) -> None:
    """Delete snapshot rows older than retention_days (raw statement snapshots sooner, see above)."""
    for table, column in RETAINED.items():
        days = min(retention_days, RAW_STATEMENT_RETENTION_DAYS) if table == "statement_snapshots" else retention_days
        store.execute(f"DELETE FROM pgpilot.{table} WHERE {column} < now() - make_interval(days => %s)", (days,))
