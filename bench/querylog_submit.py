"""Query log benchmark: what QueryLog.submit costs the session, what statement analysis costs the writer.

    python -m bench.querylog_submit [--quick] [--events 200000] [--rounds 5] [--no-store] [--json out.json]

Part 1 (hot path): ns per submit(), next to a bare deque.append of the same event (the floor), and the cost of
building the QueryEvent that the session pays as well.
Part 2 (background): Analyzer.analyze per statement on a warm cache, for texts that differ only in their
constants (pgbench -S in simple protocol sends a new text per query) and for a repeated extended-protocol
text; and on a miss (a new statement shape each time). The reference is pglast.parser.fingerprint alone,
which is what every statement would cost without the cache.
Part 3 (background, needs a throwaway PostgreSQL): CPU microseconds per event spent by the writer from
submit to committed rows (analysis, stats, COPY), next to a bare asyncpg COPY of the same rows.
Every part interleaves the measured code with its reference, round after round, and reports medians.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque

from pglast import parser as pg_parser

from proxy.analysis import Analyzer, literal_key
from proxy.config import QueryLogConfig
from proxy.querylog import COLUMNS, QueryEvent, QueryLog

WORKLOADS = {
    "pgbench -S (simple)": lambda r: f"SELECT abalance FROM pgbench_accounts WHERE aid = {r.randint(1, 10**6)};",
    "join, 4 literals": lambda r: (
        "SELECT o.id, c.name FROM orders o JOIN public.customers c ON c.id = o.cid "
        f"WHERE o.created > '2024-01-{r.randint(10, 28)}' AND o.status IN ('a','b') ORDER BY o.id "
        f"LIMIT {r.randint(1, 100)}"),
    "ORM, quoted names": lambda r: (
        'SELECT "auth_user"."id", "auth_user"."password", "auth_user"."last_login" FROM "auth_user" '
        f'WHERE "auth_user"."id" = {r.randint(1, 10**6)} LIMIT 21'),
    "with a comment": lambda r: f"SELECT x FROM t WHERE a = {r.randint(1, 10**6)} /* request {r.random()} */",
    "extended ($1, repeated)": lambda r: "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def event(sql: str, i: int = 0) -> QueryEvent:
    return QueryEvent(ts=time.time(), duration_us=250, wait_us=3, sql=sql, rows=1, bytes_out=120, sqlstate=None,
                      database="bench", username="bench", application_name="pgbench", client_addr="127.0.0.1",
                      backend_pid=1234, xact_id=i, in_transaction=False, protocol="simple")


def per_item_ns(fn, items) -> float:
    start = time.perf_counter_ns()
    fn(items)
    return (time.perf_counter_ns() - start) / len(items)


def bench_submit(n: int, rounds: int) -> list[dict]:
    rng = random.Random(1)
    texts = [WORKLOADS["pgbench -S (simple)"](rng) for _ in range(n)]
    events = [event(t, i) for i, t in enumerate(texts)]
    writer = QueryLog(QueryLogConfig(queue_size=n + 1, batch_size=n + 1, spool_max_bytes=0), "postgresql://x/y", "b")
    floor: deque = deque()

    def submit_all(evs):
        submit = writer.submit
        for ev in evs:
            submit(ev)

    def append_all(evs):
        append = floor.append
        for ev in evs:
            append(ev)

    def build_all(sqls):
        for i, s in enumerate(sqls):
            QueryEvent(ts=1.0, duration_us=250, wait_us=3, sql=s, rows=1, bytes_out=120, sqlstate=None,
                       database="bench", username="bench", application_name="pgbench", client_addr="127.0.0.1",
                       backend_pid=1234, xact_id=i, in_transaction=False, protocol="simple", stmt_index=0)

    def build_all_positional(sqls):
        for i, s in enumerate(sqls):
            QueryEvent(1.0, 250, 3, s, 1, 120, None, "bench", "bench", "pgbench", "127.0.0.1", 1234, i, False,
                       "simple", None, None, None, None, 0)

    built, positional = "QueryEvent(...) by keyword (session's call)", "QueryEvent(...) by position"
    results = {"submit()": [], "deque.append (floor)": [], built: [], positional: []}
    for r in range(rounds):
        results["deque.append (floor)"].append(per_item_ns(append_all, events))
        floor.clear()
        results["submit()"].append(per_item_ns(submit_all, events))
        writer._events.clear()
        writer._queued = 0
        results[built].append(per_item_ns(build_all, texts))
        results[positional].append(per_item_ns(build_all_positional, texts))
        log(f"submit round {r + 1}/{rounds}: {results['submit()'][-1]:.0f} ns")
    return [{"what": k, "ns_per_event": statistics.median(v), "rounds": v} for k, v in results.items()]


def bench_analysis(n: int, rounds: int) -> list[dict]:
    rows = []
    for name, make in WORKLOADS.items():
        rng = random.Random(2)
        texts = [make(rng) for _ in range(n)]
        analyzer = Analyzer()
        analyzer.analyze(texts[0])
        warm, key, fp = [], [], []
        for _ in range(rounds):
            warm.append(per_item_ns(lambda ts: [analyzer.analyze(t) for t in ts], texts) / 1000)
            key.append(per_item_ns(lambda ts: [literal_key(t) for t in ts], texts) / 1000)
            fp.append(per_item_ns(lambda ts: [pg_parser.fingerprint(t) for t in ts], texts) / 1000)
        assert analyzer.misses == 1, f"{name}: texts differing in constants missed the cache"
        rows.append({"workload": name, "warm_us": statistics.median(warm), "key_us": statistics.median(key),
                     "fingerprint_us": statistics.median(fp), "ratio": statistics.median(
                         w / f for w, f in zip(warm, fp))})
        log(f"analysis {name}: warm {rows[-1]['warm_us']:.2f} us, fingerprint {rows[-1]['fingerprint_us']:.2f} us")
    # Misses: every text a new shape (new table and column names), on a fresh cache each round.
    miss, fp = [], []
    count = max(200, n // 20)
    for r in range(rounds):
        texts = [f"SELECT c{r}_{i}, b FROM t{r}_{i} JOIN u ON u.id = t{r}_{i}.uid WHERE a = {i} AND s = 'x'"
                 for i in range(count)]
        analyzer = Analyzer()
        miss.append(per_item_ns(lambda ts: [analyzer.analyze(t) for t in ts], texts) / 1000)
        fp.append(per_item_ns(lambda ts: [pg_parser.fingerprint(t) for t in ts], texts) / 1000)
    rows.append({"workload": "miss (new shape each time)", "warm_us": statistics.median(miss), "key_us": None,
                 "fingerprint_us": statistics.median(fp),
                 "ratio": statistics.median(m / f for m, f in zip(miss, fp))})
    log(f"analysis miss: {rows[-1]['warm_us']:.1f} us")
    return rows


async def _writer_round(dsn: str, events: list[QueryEvent], spool_dir: str) -> tuple[float, float]:
    cfg = QueryLogConfig(queue_size=len(events) + 1, batch_size=5000, flush_interval=0.05, spool_dir=spool_dir)
    writer = QueryLog(cfg, dsn, "bench")
    await writer.start()
    await writer.wait_ready()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(events), 1000):
        for ev in events[i:i + 1000]:
            writer.submit(ev)
        await asyncio.sleep(0)
    await writer.flush(timeout=300)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await writer.stop()
    assert writer.written == len(events) and writer.spooled == 0, writer.stats()
    return cpu * 1e6 / len(events), len(events) / wall


async def _copy_round(dsn: str, events: list[QueryEvent]) -> tuple[float, float]:
    import asyncpg
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC", "synchronous_commit": "off"})
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(events), 5000):
        records = [(dt.datetime.fromtimestamp(e.ts, dt.timezone.utc), e.duration_us, e.wait_us, "f", "select",
                    ["pgbench_accounts"], [], e.rows, e.bytes_out, e.sqlstate, e.database, e.username,
                    e.application_name, e.client_addr, e.backend_pid, e.xact_id, e.in_transaction, e.protocol,
                    None, None, None, "bench", None) for e in events[i:i + 5000]]
        await conn.copy_records_to_table("query_event_rows", schema_name="pgpilot", columns=COLUMNS, records=records)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await conn.close()
    return cpu * 1e6 / len(events), len(events) / wall


def bench_writer(n: int, rounds: int) -> list[dict]:
    from tests.support.services import PgCluster
    cluster = PgCluster().start()
    spool = None
    try:
        cluster.psql("CREATE DATABASE logstore")
        dsn = cluster.dsn_for("logstore")
        rng = random.Random(3)
        events = [event(WORKLOADS["pgbench -S (simple)"](rng), i) for i in range(n)]
        spool = tempfile.mkdtemp(prefix="pgpilot-bench-spool-")
        results = {"QueryLog (analysis + stats + COPY)": [], "bare asyncpg COPY (reference)": []}
        for r in range(rounds):
            results["QueryLog (analysis + stats + COPY)"].append(asyncio.run(_writer_round(dsn, events, spool)))
            results["bare asyncpg COPY (reference)"].append(asyncio.run(_copy_round(dsn, events)))
            cluster.psql("TRUNCATE pgpilot.query_event_groups, pgpilot.query_event_rows", dbname="logstore")
            log(f"writer round {r + 1}/{rounds}: "
                f"{results['QueryLog (analysis + stats + COPY)'][-1][0]:.1f} us CPU per event")
        return [{"what": k, "cpu_us_per_event": statistics.median(c for c, _ in v),
                 "events_per_s": statistics.median(t for _, t in v), "rounds": v} for k, v in results.items()]
    finally:
        cluster.destroy()
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke size (CI)")
    ap.add_argument("--no-store", action="store_true", help="skip part 3 (needs PostgreSQL binaries)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.rounds = 5_000, 3
    out = {"submit": bench_submit(args.events, args.rounds),
           "analysis": bench_analysis(max(1000, args.events // 10), args.rounds)}
    if not args.no_store:
        out["writer"] = bench_writer(max(5000, args.events // 4), args.rounds)

    print(f"\nsubmit() and event construction, median of {args.rounds} rounds of {args.events} events")
    print(f"{'':42} {'ns/event':>9}")
    for row in out["submit"]:
        print(f"{row['what']:42} {row['ns_per_event']:9.0f}")
    print("\nAnalyzer.analyze per statement (us), texts differing in constants; reference: pglast fingerprint")
    print(f"{'workload':30} {'analyze':>8} {'key':>7} {'fingerprint':>12} {'ratio':>6}")
    for row in out["analysis"]:
        key = f"{row['key_us']:7.2f}" if row["key_us"] is not None else f"{'-':>7}"
        print(f"{row['workload']:30} {row['warm_us']:8.2f} {key} {row['fingerprint_us']:12.2f} {row['ratio']:6.2f}")
    if "writer" in out:
        print("\nwriter, pgbench -S events end to end (CPU of this process per event, wall throughput)")
        print(f"{'':38} {'CPU us/event':>12} {'events/s':>10}")
        for row in out["writer"]:
            print(f"{row['what']:38} {row['cpu_us_per_event']:12.1f} {row['events_per_s']:10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
