"""Collector benchmark: bloat accuracy of both methods against pgstattuple, and what one collector run costs.

    python -m bench.collectors [--quick] [--rows 50000] [--tables 100] [--statements 2000] [--rounds 3] [--json out.json]

Part 1 builds tables of several row shapes with a known share of dead tuples (deleted or updated rows, autovacuum
off, ANALYZE), and compares the bloat recorded by the resources collector (pgstattuple_approx, and the statistical
estimate) with pgstattuple's exact dead_tuple_percent + free_percent.
Part 2 fills a database with tables, indexes, distinct statements and log-store templates, then times
run_collectors per collector, interleaved with a reference: the bare reads of the same system views.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import psycopg
from psycopg.rows import dict_row

from learning.collectors import run_collectors
from learning.collectors.common import CollectorResult, Target, connect
from learning.collectors.resources import TABLES_SQL, table_bloat
from proxy.logstore import ensure_schema_sync
from tests.support.services import PgCluster

SHAPES = {
    "narrow (2 ints)": ("a int, b int", "g, g"),
    "medium (int + 100 chars)": ("a int, note text", "g, repeat('x', 100)"),
    "wide, nullable (5 cols)": ("a int, b bigint, c text, d text, e timestamptz",
                                "g, g, repeat('y', 300), CASE WHEN g % 3 = 0 THEN NULL ELSE md5(g::text) END, now()"),
}
# {t} is the table, {n} its row count; the last case leaves most pages all-visible, which pgstattuple_approx
# then reads from the free space map instead of scanning.
CHANGES = [("none", []), ("delete 10%", ["DELETE FROM {t} WHERE a % 10 < 1"]),
           ("delete 30%", ["DELETE FROM {t} WHERE a % 10 < 3"]), ("delete 70%", ["DELETE FROM {t} WHERE a % 10 < 7"]),
           ("update 50%", ["UPDATE {t} SET a = a WHERE a % 2 = 0"]),
           ("vacuum, del 1st 30%", ["VACUUM {t}", "DELETE FROM {t} WHERE a <= {n} * 3 / 10"])]

RAW_READS = ["SELECT * FROM pg_stat_statements", "SELECT * FROM pg_stat_database", "SELECT * FROM pg_stat_bgwriter",
             "SELECT * FROM pg_stat_activity", "SELECT * FROM pg_locks", "SELECT * FROM pg_stat_user_tables",
             "SELECT * FROM pg_statio_user_tables", "SELECT * FROM pg_stat_user_indexes"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bloat_accuracy(dsn: str, rows: int) -> list[dict]:
    results = []
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        for s, (columns, values) in enumerate(SHAPES.values()):
            for c, (_, change) in enumerate(CHANGES):
                table = f"bloat_{s}_{c}"
                app.execute(f"CREATE TABLE {table} ({columns}) WITH (autovacuum_enabled = off)")
                app.execute(f"INSERT INTO {table} SELECT {values} FROM generate_series(1, {rows}) g")
                for statement in change:
                    app.execute(statement.format(t=table, n=rows))
                app.execute("SELECT pg_stat_force_next_flush()")
                app.execute(f"ANALYZE {table}")
        target = Target("bench", connect(dsn))
        with target.conn.cursor(row_factory=dict_row) as cur:
            tables = [t for t in cur.execute(TABLES_SQL).fetchall() if t["relname"].startswith("bloat_")]
        approx = table_bloat(target, tables, CollectorResult(), "auto")
        estimated = table_bloat(target, tables, CollectorResult(), "statistical")
        for t in sorted(tables, key=lambda t: t["relname"]):
            s, c = (int(x) for x in t["relname"].split("_")[1:])
            exact = app.execute("SELECT dead_tuple_percent + free_percent FROM pgstattuple(%s)",
                                (t["relid"],)).fetchone()[0]
            results.append({"shape": list(SHAPES)[s], "change": CHANGES[c][0], "exact": exact,
                            "pgstattuple_approx": approx[t["relid"]][0], "statistical": estimated[t["relid"]][0]})
        target.conn.close()
    return results


def build_workload(dsn: str, tables: int, statements: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        ensure_schema_sync(app)
        app.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for i in range(tables):
            app.execute(f"CREATE TABLE w{i} (id int PRIMARY KEY, c0 int, c1 int, c2 text)")
            app.execute(f"INSERT INTO w{i} SELECT g, g % 7, g % 11, 'v' || g FROM generate_series(1, 200) g")
            app.execute(f"CREATE INDEX w{i}_c0 ON w{i} (c0)")
        for k in range(statements):
            app.execute(f"SELECT c{k % 3} FROM w{k % tables} WHERE id = {k} AND c{(k // tables) % 2} >= {k % 5}"
                        + " AND c0 < 100" * (k // (tables * 2)))
        app.execute("ANALYZE")
        for k in range(min(statements, 200)):
            sql = f"SELECT c2 FROM w{k % tables} WHERE c0 = $1" + " AND c1 > $2" * (k // tables)
            fp = f"bench{k:04d}"
            app.execute("INSERT INTO pgpilot.templates (fingerprint, normalized_sql, kind, first_seen, last_seen) "
                        "VALUES (%s, %s, 'select', now(), now())", (fp, sql))
            app.execute("INSERT INTO pgpilot.query_events (ts, duration_us, fingerprint, kind, database) "
                        "SELECT now(), 100, %s, 'select', current_database() FROM generate_series(1, 25)", (fp,))


def collector_cost(dsn: str, rounds: int) -> dict:
    timings: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as raw:
        for r in range(rounds):
            started = time.perf_counter()
            for sql in RAW_READS:
                raw.execute(sql).fetchall()
            timings.setdefault("reference: bare view reads", []).append(time.perf_counter() - started)
            summary = run_collectors(dsn)
            for name, s in summary.items():
                timings.setdefault(name, []).append(s["seconds"])
                rows[name] = s["rows"]
            timings.setdefault("all collectors", []).append(sum(s["seconds"] for s in summary.values()))
            log(f"round {r + 1}/{rounds}: {sum(s['seconds'] for s in summary.values()):.2f}s")
    return {name: {"median_seconds": statistics.median(t), "rows": rows.get(name)} for name, t in timings.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.collectors", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke size")
    ap.add_argument("--rows", type=int, default=50_000, help="rows per bloat table")
    ap.add_argument("--tables", type=int, default=100)
    ap.add_argument("--statements", type=int, default=2000, help="distinct statements in pg_stat_statements")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.tables, args.statements = 5000, 10, 100
    cluster = PgCluster().start()
    try:
        cluster.psql("CREATE DATABASE bloat")
        cluster.psql("CREATE DATABASE workload")
        log(f"bloat accuracy: {len(SHAPES) * len(CHANGES)} tables of {args.rows} rows")
        accuracy = bloat_accuracy(cluster.dsn_for("bloat"), args.rows)
        log(f"workload: {args.tables} tables, {args.statements} distinct statements")
        build_workload(cluster.dsn_for("workload"), args.tables, args.statements)
        cost = collector_cost(cluster.dsn_for("workload"), args.rounds)
    finally:
        cluster.destroy()

    print(f"\nBloat (% of heap: dead + free) vs pgstattuple, {args.rows} rows per table")
    print(f"{'shape':26} {'change':20} {'exact':>6} {'approx':>7} {'statistical':>12}")
    for a in accuracy:
        print(f"{a['shape']:26} {a['change']:20} {a['exact']:6.1f} {a['pgstattuple_approx']:7.1f} "
              f"{a['statistical']:12.1f}")
    for method in ("pgstattuple_approx", "statistical"):
        errors = [abs(a[method] - a["exact"]) for a in accuracy]
        print(f"{method}: mean |error| {statistics.mean(errors):.1f} points, max {max(errors):.1f}")
    print(f"\nOne collector run, median of {args.rounds} rounds ({args.tables} tables, {args.statements} statements)")
    print(f"{'collector':28} {'seconds':>8} {'rows':>7}")
    for name, c in cost.items():
        print(f"{name:28} {c['median_seconds']:8.3f} {c['rows'] if c['rows'] is not None else '':>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bloat": accuracy, "cost": cost}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
