"""Index advisor benchmark on TPC-H: pgpilot's advice against a Dexter-style baseline, estimated and measured.

    python -m bench.advisor_tpch [--scale 0.1] [--rounds 3] [--budgets 25,50,100] [--json out.json]
                                 [--no-parameters] [--timeout 300] [--min-gain-per-size X]

A throwaway PostgreSQL 15 is loaded with TPC-H (tpchgen-cli) and the 22 templates run at fixed frequencies
with varied parameters, logged to pgpilot.query_events as the proxy logs them. At each storage budget (a
share of the tables' size) three advisors choose indexes from that log: pgpilot, and the Dexter-style
baseline at its 50% and 10% savings thresholds (it has no budget: its picks are kept by decreasing savings
while they fit, and the row says when that trimmed it). For each choice the table shows the indexes, their
size, the estimated workload cost relative to no indexes (HypoPG, calls-weighted, on instances the advisors
never saw), and the real runtime of the workload with the indexes built (one copy of the database per
configuration): each round runs one of those unseen instances of every template under every configuration
in turn, their order rotated, and weights its time by the template's frequency. Each budget's pgpilot row
is judged against the Dexter setting with the lowest estimated cost within that budget ("vs"); when a
baseline row takes less space than pgpilot's, pgpilot is also run with that row's space as its budget
("pgpilot<=dexter-50%"), so every comparison has pgpilot using no more storage. "worst" names the template
whose estimated cost (unseen instances) and runtime rose most against no indexes. With --no-parameters the
log holds no values: both advisors plan generic plans (as Dexter does on PostgreSQL 15). Parallel query and
JIT are off so that runtimes compare plans, not the machine's mood.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import signal
import statistics
import sys
import time

import psycopg

from advisors.catalog import format_bytes, load_catalog
from advisors.dexter import dexter_advise, within_budget
from advisors.indexes import AdvisorSettings, WorkloadCost, advise_indexes
from advisors.whatif import IndexSpec, WhatIf
from advisors.workload import Instance, Workload, load_workload
from bench.workloads.recorder import Recorder, Statement, analyze_text
from bench.workloads.tpch import TABLES, TEMPLATES, load_tpch
from tests.support.services import PgCluster

# Calls per template in the logged workload: frequent selective reports, rare heavy analyses.
FREQUENCIES = {1: 4, 2: 8, 3: 10, 4: 6, 5: 6, 6: 12, 7: 4, 8: 4, 9: 3, 10: 8, 11: 6, 12: 6, 13: 3, 14: 10,
               15: 4, 16: 6, 17: 2, 18: 3, 19: 6, 20: 2, 21: 3, 22: 6}

log = logging.getLogger("pgpilot.bench.advisor")


def record_workload(dsn: str, scale: float, parameters: bool, seed: int = 1) -> int:
    rng = random.Random(seed)
    statements = [Statement(TEMPLATES[n](rng, scale=scale)) for n, calls in FREQUENCIES.items()
                  for _ in range(calls)]
    rng.shuffle(statements)
    log.info("logging the workload: %d statements", len(statements))
    with Recorder(dsn, dsn, log_parameters=parameters, progress_every=30) as recorder:
        summary = recorder.run(statements)
    log.info("logged %d statements in %.0fs (%d errors)", summary.statements, summary.seconds, summary.errors)
    return summary.statements


def unseen_workload(workload: Workload, held_out: list[dict[int, str]]) -> Workload:
    """The logged workload's templates and frequencies, with the held-out instances (literal SQL) to plan."""
    by_fp: dict[str, list[str]] = {}
    for instances in held_out:
        for sql in instances.values():
            by_fp.setdefault(analyze_text(sql)[0].fingerprint, []).append(sql)
    templates = []
    for t in workload.templates:
        sqls = by_fp.get(t.fingerprint)
        if sqls:
            fresh = copy.copy(t)
            fresh.instances = [Instance(sql, None, "literal", frozenset(t.tables)) for sql in sqls]
            templates.append(fresh)
    return Workload(templates, workload.source, workload.window_start, workload.window_end,
                    workload.write_rows, workload.updated_columns)


def drop_secondary_indexes(conn) -> None:
    for (name,) in conn.execute(
            """SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'public' AND NOT i.indisprimary""").fetchall():
        conn.execute(f"DROP INDEX {name}")


def build(conn, specs: list[IndexSpec]) -> tuple[float, int]:
    """Create the configuration's indexes (after dropping any other secondary index); (seconds, bytes)."""
    drop_secondary_indexes(conn)
    started = time.monotonic()
    total = 0
    for i, spec in enumerate(specs):
        name = f"bench_idx_{i}"
        conn.execute(spec.create_sql(name, concurrently=False))
        total += conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()[0]
    conn.execute("ANALYZE")
    return time.monotonic() - started, total


def measure(dsns: dict, held_out: list[dict[int, str]], timeout_s: float) -> tuple[dict, dict]:
    """Seconds per configuration, round and template: each template runs under every configuration in turn
    (their order rotated), so a load spike on the machine hits all configurations alike."""
    conns = {k: psycopg.connect(dsn, autocommit=True) for k, dsn in dsns.items()}
    keys = list(dsns)
    times = {k: [] for k in keys}
    capped = {k: 0 for k in keys}
    try:
        for c in conns.values():
            c.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")
            for t in TABLES:  # read every table once, so no configuration pays for a cold cache
                c.execute(f"SELECT count(*) FROM {t}").fetchone()
        for r, instances in enumerate(held_out):
            for k in keys:
                times[k].append({})
            started = time.monotonic()
            for n, sql in instances.items():
                shift = (r + n) % len(keys)
                for k in keys[shift:] + keys[:shift]:
                    t0 = time.perf_counter()
                    try:
                        conns[k].execute(sql).fetchall()
                        times[k][r][n] = time.perf_counter() - t0
                    except psycopg.errors.QueryCanceled:
                        times[k][r][n] = timeout_s
                        capped[k] += 1
            log.info("round %d measured in %.0fs", r + 1, time.monotonic() - started)
    finally:
        for c in conns.values():
            c.close()
    return times, capped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.advisor_tpch", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budgets", default="25,50,100", help="percent of the tables' size")
    p.add_argument("--timeout", type=float, default=300.0, help="per statement, seconds, in the runtime rounds")
    p.add_argument("--no-parameters", action="store_true",
                   help="log without parameter values (the advisors then plan generic plans)")
    p.add_argument("--min-gain-per-size", type=float,
                   help="pgpilot's advisors.min_gain_per_size (default: the advisor's default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the throwaway cluster is removed

    cluster = PgCluster(settings={"max_parallel_workers_per_gather": "0", "jit": "off",
                                  "shared_buffers": "256MB", "work_mem": "16MB"}).start()
    try:
        cluster.psql("CREATE DATABASE tpch")
        dsn = cluster.dsn_for("tpch")
        load_tpch(dsn, scale=args.scale)
        record_workload(dsn, args.scale, parameters=not args.no_parameters)
        conn = psycopg.connect(dsn, autocommit=True)
        catalog = load_catalog(conn)
        workload = load_workload(conn, catalog, database="tpch", instances_per_template=3)
        data_bytes = sum(catalog.tables[f"public.{t}"].heap_bytes for t in TABLES)
        settings = AdvisorSettings()
        if args.min_gain_per_size is not None:
            settings.min_gain_per_size = args.min_gain_per_size
        whatif = WhatIf(conn, catalog)
        held_out = [{n: make(random.Random(1000 + r), scale=args.scale) for n, make in TEMPLATES.items()}
                    for r in range(args.rounds)]
        evaluation = WorkloadCost(whatif, unseen_workload(workload, held_out), catalog,
                                  AdvisorSettings(instances_for_selection=args.rounds))
        logged = WorkloadCost(whatif, workload, catalog, settings)
        log.info("data %s, %d templates (%s instances), estimated cost without indexes %.4g",
                 format_bytes(data_bytes), len(logged.templates), workload.templates[0].instances[0].source,
                 evaluation.total(frozenset()))

        number = {analyze_text(sql)[0].fingerprint: n for n, sql in held_out[0].items()}
        started = time.monotonic()
        dexter = {pct: dexter_advise(whatif, workload, catalog, pct) for pct in (50.0, 10.0)}
        dexter_seconds = time.monotonic() - started
        advised: dict[int, object] = {}

        def pgpilot(budget: int):
            if budget not in advised:
                advised[budget] = advise_indexes(conn, workload, catalog, budget, settings, whatif=whatif,
                                                 include_drops=False)
            return advised[budget]

        def estimate(row: dict) -> dict:
            config = frozenset(row["indexes"])
            row["est_bytes"] = sum(whatif.size(s) for s in config)
            row["est_cost_rel"] = evaluation.total(config) / evaluation.total(frozenset())
            row["est_cost_rel_logged"] = logged.total(config) / logged.total(frozenset())
            row["definitions"] = [s.describe() for s in row["indexes"]]
            # Per template, on the unseen instances: estimated cost with the indexes over without.
            row["template_est_rel"] = {
                number[t.fingerprint]: (evaluation.template_cost(t, config) or evaluation.baseline[t.fingerprint])
                / evaluation.baseline[t.fingerprint] for t in evaluation.templates}
            return row

        rows = [estimate({"budget": None, "method": "no indexes", "indexes": [], "trimmed": False})]
        for pct in (int(b) for b in args.budgets.split(",")):
            budget = int(data_bytes * pct / 100)
            advice = pgpilot(budget)
            ours = estimate({"budget": pct, "method": "pgpilot", "trimmed": False, "seconds": advice.seconds,
                             "indexes": [r.spec for r in advice.creates]})
            theirs = []
            for thr, res in dexter.items():
                kept, trimmed = within_budget(res, whatif, budget)
                theirs.append(estimate({"budget": pct, "method": f"dexter-{thr:.0f}%", "trimmed": trimmed,
                                        "seconds": dexter_seconds / 2, "indexes": kept,
                                        "untrimmed": [s.describe() for s in res.indexes]}))
            # The baseline this budget's pgpilot row is judged against: the Dexter setting with the lowest
            # estimated cost within the budget (the smaller one on a tie).
            best = min(theirs, key=lambda r: (round(r["est_cost_rel"], 6), r["est_bytes"]))
            ours["compared_with"] = best["method"]
            rows.append(ours)
            # Same storage: pgpilot given no more than each smaller baseline row takes.
            for row in theirs:
                if row["est_bytes"] < ours["est_bytes"]:
                    advice = pgpilot(row["est_bytes"])
                    rows.append(estimate({"budget": pct, "method": f"pgpilot<={row['method']}", "trimmed": False,
                                          "seconds": advice.seconds, "compared_with": row["method"],
                                          "indexes": [r.spec for r in advice.creates]}))
            rows.extend(theirs)
        whatif.close()

        configs: dict[frozenset, list[IndexSpec]] = {}
        for row in rows:
            configs.setdefault(frozenset(row["indexes"]), row["indexes"])
        keys = list(configs)
        conn.close()
        # One copy of the database per configuration, so configurations interleave query by query.
        dsns, real_bytes = {}, {}
        for i, key in enumerate(keys):
            cluster.clone_database("tpch", f"tpch_cfg{i}")
            dsns[key] = cluster.dsn_for(f"tpch_cfg{i}")
            with psycopg.connect(dsns[key], autocommit=True) as c:
                seconds, real_bytes[key] = build(c, configs[key])
            log.info("configuration %d: %d indexes, %s, built in %.1fs", i, len(configs[key]),
                     format_bytes(real_bytes[key]), seconds)
        times, capped = measure(dsns, held_out, args.timeout)
    finally:
        cluster.destroy()

    calls = {n: float(c) for n, c in FREQUENCIES.items()}
    runtimes = {k: [sum(calls[n] * t for n, t in per_round.items()) for per_round in times[k]] for k in keys}
    none_key = frozenset()
    for row in rows:
        key = frozenset(row["indexes"])
        row["real_bytes"] = real_bytes[key]
        row["runtime_s"] = statistics.median(runtimes[key])
        row["runtime_rel"] = statistics.median(a / b for a, b in zip(runtimes[key], runtimes[none_key]))
        row["capped"] = capped[key]
        row["runtimes_s"] = runtimes[key]
        row["template_median_s"] = {n: statistics.median(r[n] for r in times[key]) for n in TEMPLATES}
        # Per template: the median over rounds of its time with the indexes over its time without, same round.
        row["template_runtime_rel"] = {n: statistics.median(a[n] / b[n] for a, b in zip(times[key], times[none_key]))
                                       for n in TEMPLATES}
    print_table(rows, data_bytes, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": args.scale, "rounds": args.rounds, "data_bytes": data_bytes,
                       "parameters_logged": not args.no_parameters, "frequencies": FREQUENCIES,
                       "rows": [{k: v for k, v in row.items() if k != "indexes"} for row in rows]},
                      f, indent=2, default=str)
    return 0


def _worst(per_template: dict) -> str:
    n = max(per_template, key=per_template.get)
    return f"Q{n} {per_template[n] - 1:+.0%}"


def print_table(rows: list[dict], data_bytes: int, args) -> None:
    print(f"\nTPC-H SF {args.scale}: data {format_bytes(data_bytes)}, {sum(FREQUENCIES.values())} logged calls "
          f"({'without' if args.no_parameters else 'with'} parameter values), {args.rounds} rounds. est.cost: HypoPG "
          "estimate on the unseen instances, runtime: measured; both calls-weighted, rel. to no indexes "
          "(runtime: median of per-round ratios). worst: the template whose estimated cost / runtime rose most "
          "against no indexes. vs: the baseline row a pgpilot row is judged against (pgpilot: the Dexter setting "
          "with the lowest estimated cost within the budget; pgpilot<=X: given no more space than X takes)")
    head = (f"{'budget':>7} {'method':<22} {'#idx':>4} {'size':>9} {'est.cost':>9} {'runtime':>9} {'rel.':>6} "
            f"{'worst est':>10} {'worst run':>10}  vs")
    print(head)
    print("-" * len(head))
    for row in rows:
        budget = "-" if row["budget"] is None else f"{row['budget']}%"
        note = " (trimmed)" if row["trimmed"] else ""
        note += f" ({row['capped']} timeouts)" if row["capped"] else ""
        worst = f"{_worst(row['template_est_rel']):>10} {_worst(row['template_runtime_rel']):>10}" \
            if row["definitions"] else f"{'':>10} {'':>10}"
        print(f"{budget:>7} {row['method']:<22} {len(row['definitions']):>4} {format_bytes(row['real_bytes']):>9} "
              f"{row['est_cost_rel']:>9.2%} {row['runtime_s']:>8.1f}s {row['runtime_rel']:>6.1%} {worst}  "
              f"{row.get('compared_with', '')}{note}")
    print()
    for row in rows:
        other = next((r for r in rows if r["budget"] == row["budget"] and r["method"] == row.get("compared_with")),
                     None)
        if other is None:
            continue
        checks = {"size": row["real_bytes"] <= other["real_bytes"],
                  "est.cost": row["est_cost_rel"] < other["est_cost_rel"],
                  "runtime": row["runtime_rel"] < other["runtime_rel"]}
        row["beats_baseline"] = checks
        print(f"{row['budget']:>3}% {row['method']:<22} vs {other['method']:<12} "
              f"size {format_bytes(row['real_bytes'])} / {format_bytes(other['real_bytes'])}, "
              f"est.cost {row['est_cost_rel']:.2%} / {other['est_cost_rel']:.2%}, "
              f"runtime {row['runtime_rel']:.1%} / {other['runtime_rel']:.1%}: "
              + ", ".join(f"{k} {'ok' if v else 'NOT'}" for k, v in checks.items()))
    print()
    for row in rows:
        if row["definitions"]:
            budget = "-" if row["budget"] is None else f"{row['budget']}%"
            print(f"{budget:>4} {row['method']:<22} " + "; ".join(row["definitions"]))


if __name__ == "__main__":
    sys.exit(main())
