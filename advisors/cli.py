"""`pgpilot advise indexes|partitions|history`: advice on demand, as a table, a SQL script or JSON.

Nothing is created or dropped in the target database unless --apply is given (indexes only); the advice
itself is recorded in the log store (pgpilot.advice_log) so later runs can report what became of it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys

from advisors.catalog import format_bytes, parse_bytes

log = logging.getLogger("pgpilot.advisors")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="pgpilot configuration file (config.yaml)")
    common.add_argument("--dsn", help="the database to advise on (default: the first database in the config)")
    common.add_argument("--logstore-dsn", help="the log store (default: query_log.dsn, else --dsn)")
    common.add_argument("--database", help="database name in the query log (default: the target's name)")
    common.add_argument("--format", choices=("table", "sql", "json"), default="table")
    common.add_argument("--window-days", type=float, help="how much of the query log to read")
    common.add_argument("--no-record", action="store_true", help="do not write to pgpilot.advice_log")
    common.add_argument("-v", "--verbose", action="store_true")
    p = argparse.ArgumentParser(prog="pgpilot advise", description="Index and partition advice from the query log.")
    sub = p.add_subparsers(dest="what", required=True)
    ix = sub.add_parser("indexes", parents=[common], help="indexes to create and to drop")
    ix.add_argument("--budget", help="space for new indexes: 500MB, 2GB, or 25%% of the tables' size")
    ix.add_argument("--min-gain-per-size", type=float, metavar="X",
                    help="an index must cut the remaining workload cost by X times the share of the data's size "
                         "it takes (default: advisors.min_gain_per_size, 0.25; 0: no size bar)")
    ix.add_argument("--no-drops", action="store_true", help="do not look at existing indexes")
    ix.add_argument("--baseline", action="store_true", help="also show what a Dexter-style advisor would pick")
    ix.add_argument("--apply", action="store_true", help="run the CREATE INDEX CONCURRENTLY statements")
    ix.add_argument("--apply-drops", action="store_true", help="with --apply, also run the DROP INDEX statements")
    pt = sub.add_parser("partitions", parents=[common], help="whether and how to partition tables")
    pt.add_argument("--table", action="append", help="only this table (repeatable)")
    pt.add_argument("--no-validate", action="store_true", help="do not try the plan on a sample copy")
    sub.add_parser("history", parents=[common], help="earlier advice and what became of it")
    sub.add_parser("rewrites", parents=[common], help="query rewrites (not available yet)")
    return p


def _dsn_from_config(cfg) -> tuple[str | None, str | None]:
    if not cfg.databases:
        return None, None
    name, db = next(iter(cfg.databases.items()))
    auth = db.user + (f":{db.password}" if db.password else "")
    return f"postgresql://{auth}@{db.host}:{db.port}/{db.dbname}?sslmode={db.sslmode}", name


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.what == "rewrites":
        print("pgpilot advise rewrites: no rewrite advisor yet", file=sys.stderr)
        return 2
    import psycopg

    from proxy.config import ConfigError, load_config
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    dsn, config_name = _dsn_from_config(cfg)
    dsn = args.dsn or dsn
    if not dsn:
        print("pgpilot advise: no database: give --dsn or a databases entry in the config", file=sys.stderr)
        return 2
    logstore_dsn = args.logstore_dsn or cfg.query_log.dsn or dsn
    settings = cfg.advisors
    try:
        target = psycopg.connect(dsn, autocommit=True, application_name="pgpilot-advisor")
        store = target if logstore_dsn == dsn else psycopg.connect(logstore_dsn, autocommit=True,
                                                                    application_name="pgpilot-advisor")
    except psycopg.Error as e:
        print(f"pgpilot advise: cannot connect: {e}", file=sys.stderr)
        return 1
    try:
        if args.what == "indexes":
            return _indexes(args, target, store, settings, config_name)
        if args.what == "partitions":
            return _partitions(args, target, store, settings, config_name)
        return _history(args, target, store)
    finally:
        target.close()
        if store is not target:
            store.close()


def _workload(args, target, store, settings, config_name):
    from advisors.catalog import load_catalog
    from advisors.workload import load_workload
    catalog = load_catalog(target)
    window = dt.timedelta(days=args.window_days or settings.workload_window_days)
    workload = load_workload(store, catalog, database=args.database or config_name or catalog.database,
                             window=window, instances_per_template=settings.instances_per_template,
                             min_calls=settings.min_calls, synthesize=settings.synthesize_parameters,
                             target_conn=target)
    if not workload.templates and (args.database or config_name) and catalog.database != (
            args.database or config_name):
        workload = load_workload(store, catalog, database=catalog.database, window=window,
                                 instances_per_template=settings.instances_per_template,
                                 min_calls=settings.min_calls, synthesize=settings.synthesize_parameters,
                                 target_conn=target)
    return catalog, workload


def resolve_budget(text: str, catalog, workload) -> int:
    """'500MB' as bytes, or 'N%' of the heap size of the tables the workload reads."""
    text = text.strip()
    if text.endswith("%"):
        from advisors.indexes import workload_data_bytes
        return int(workload_data_bytes(workload, catalog) * float(text[:-1]) / 100)
    return parse_bytes(text)


def _indexes(args, target, store, settings, config_name) -> int:
    from advisors.advice_log import check_earlier_advice, record_index_advice
    from advisors.indexes import AdvisorSettings, advise_indexes, apply_advice
    from advisors.whatif import WhatIf

    catalog, workload = _workload(args, target, store, settings, config_name)
    budget = resolve_budget(args.budget or settings.storage_budget, catalog, workload)
    whatif = WhatIf(target, catalog)
    try:
        advisor_settings = AdvisorSettings.from_config(settings)
        if args.min_gain_per_size is not None:
            advisor_settings.min_gain_per_size = args.min_gain_per_size
        advice = advise_indexes(target, workload, catalog, budget, advisor_settings,
                                whatif=whatif, include_drops=not args.no_drops)
        baseline = None
        if args.baseline:
            from advisors.dexter import dexter_advise
            baseline = {pct: dexter_advise(whatif, workload, catalog, pct) for pct in (50.0, 10.0)}
    finally:
        whatif.close()
    checks = []
    if not args.no_record:
        run_id = record_index_advice(store, advice)
        checks = check_earlier_advice(store, catalog, advice.current_costs, exclude_run=run_id)
    out = sys.stdout
    if args.format == "json":
        data = advice.to_dict()
        data["earlier_advice"] = [c.to_dict() for c in checks]
        if baseline:
            data["dexter_baseline"] = {str(k): [s.describe() for s in v.indexes] for k, v in baseline.items()}
        json.dump(data, out, indent=2, default=str)
        out.write("\n")
    elif args.format == "sql":
        out.write(index_script(advice))
    else:
        out.write(index_table(advice, checks, baseline))
    if args.apply:
        apply_advice(target, advice, drops=args.apply_drops, log_each=lambda m: print(m, file=sys.stderr))
    return 0


def index_script(advice) -> str:
    lines = [f"-- pgpilot index advice for {advice.database}: estimated workload cost "
             f"{advice.cost_before:.4g} -> {advice.cost_after:.4g}, {format_bytes(advice.used_bytes)} of "
             f"{format_bytes(advice.budget_bytes)}",
             "-- CONCURRENTLY statements cannot run inside a transaction block: run this file with psql as is."]
    for r in advice.recommendations:
        lines.append(f"\n-- {r.action} {r.definition}: {r.reason}; {format_bytes(r.size_bytes)}, "
                     f"confidence {r.confidence_label} ({r.confidence:.2f})")
        for e in r.templates[:5]:
            lines.append(f"--   {e.calls:.0f} calls, cost {e.cost_before:.4g} -> {e.cost_after:.4g}: {e.label}")
        lines.append(r.ddl)
    if not advice.recommendations:
        lines.append("-- nothing to do")
    return "\n".join(lines) + "\n"


def index_table(advice, checks=(), baseline=None) -> str:
    lines = [f"Index advice for {advice.database} ({advice.workload_source}: {advice.templates} templates, "
             f"{advice.calls:.0f} calls; instances: "
             + ", ".join(f"{k} {v}" for k, v in sorted(advice.instance_sources.items())) + ")",
             f"Estimated workload cost {advice.cost_before:.4g} -> {advice.cost_after:.4g} "
             f"({(advice.cost_after / advice.cost_before if advice.cost_before else 1):.1%}), new indexes "
             f"{format_bytes(advice.used_bytes)} of a {format_bytes(advice.budget_bytes)} budget "
             f"[{advice.seconds:.1f}s, {advice.explains} plans]", ""]
    creates, drops = advice.creates, advice.drops
    if creates:
        lines.append(f"{'create':<70} {'size':>9} {'benefit':>10} {'conf':>6}")
        for r in creates:
            lines.append(f"{r.definition[:70]:<70} {format_bytes(r.size_bytes):>9} {r.benefit:>10.4g} "
                         f"{r.confidence_label:>6}")
            for e in r.templates[:3]:
                lines.append(f"    {e.calls:>6.0f} x {e.cost_before:>10.4g} -> {e.cost_after:<10.4g} {e.label[:60]}")
        lines.append("")
    if drops:
        lines.append(f"{'drop':<40} {'size':>9} {'conf':>6}  reason")
        for r in drops:
            lines.append(f"{r.index_name[:40]:<40} {format_bytes(r.size_bytes):>9} {r.confidence_label:>6}  {r.reason}")
        lines.append("")
    if not creates and not drops:
        lines.append("No index changes advised.")
        lines.append("")
    if baseline:
        for pct, res in baseline.items():
            lines.append(f"Dexter-style ({pct:.0f}% savings): " + (", ".join(s.describe() for s in res.indexes)
                                                                   or "nothing"))
        lines.append("")
    if checks:
        lines.append("Earlier advice:")
        for c in checks:
            ratio = f", cost now {c.cost_ratio:.0%} of before (estimated {c.expected_ratio:.0%})" \
                if c.cost_ratio is not None and c.expected_ratio is not None else ""
            scans = f", {c.idx_scan} scans" if c.idx_scan is not None and c.kind == "create_index" else ""
            lines.append(f"  {c.advised_at} {c.kind} {c.signature}: {c.outcome}{scans}{ratio}")
        lines.append("")
    for note in advice.notes:
        lines.append(f"note: {note}")
    lines.append("Apply with: pgpilot advise indexes --format sql > advice.sql && psql -f advice.sql "
                 "(or --apply)")
    return "\n".join(lines) + "\n"


def _partitions(args, target, store, settings, config_name) -> int:
    from advisors.partitions import advise_partitions
    catalog, workload = _workload(args, target, store, settings, config_name)
    try:
        results = advise_partitions(target, workload, catalog, settings, log_conn=store, tables=args.table,
                                    validate_plan=not args.no_validate)
    except ValueError as e:
        print(f"pgpilot advise partitions: {e}", file=sys.stderr)
        return 2
    if not args.no_record:
        from advisors.advice_log import ensure_schema
        ensure_schema(store)
        import uuid
        run_id = uuid.uuid4().hex[:12]
        for a in results:
            if a.decision == "partition":
                store.execute(
                    """INSERT INTO pgpilot.advice_log (run_id, database, kind, table_name, signature, ddl, reason)
                       VALUES (%s, %s, 'partition', %s, %s, %s, %s)""",
                    (run_id, catalog.database, a.table, f"{a.table}:{a.strategy}({a.key}) {a.interval or ''}",
                     a.script(), a.reason))
    out = sys.stdout
    if args.format == "json":
        json.dump([a.to_dict() for a in results], out, indent=2, default=str)
        out.write("\n")
    elif args.format == "sql":
        for a in results:
            out.write(a.script() if a.decision == "partition" else f"-- {a.table}: do not partition: {a.reason}\n")
            out.write("\n")
    else:
        out.write(partition_table(results))
    return 0


def partition_table(results) -> str:
    lines = []
    for a in results:
        head = f"{a.table} ({format_bytes(a.total_bytes)}, {a.rows:.0f} rows): "
        if a.decision != "partition":
            lines.append(head + f"do not partition: {a.reason}")
            continue
        how = f"{a.strategy.upper()} on {a.key}" + (f" by {a.interval}" if a.interval else "") + (
            f", modulus {a.modulus}" if a.modulus else "")
        lines.append(head + f"partition: {how}: {a.reason}")
        for w in a.warnings:
            lines.append(f"    warning: {w}")
        v = a.validation
        if v:
            if v.get("plan_ran"):
                lines.append(f"    plan tried on a {v['sample_percent']}% sample ({v['sample_rows']} rows, "
                             f"{v['partitions']} partitions): rows {'match' if v['rows_match'] else 'DIFFER'}"
                             + (f", workload cost x{v['cost_ratio']:.2f}" if v.get("cost_ratio") else ""))
                for t in v.get("templates", [])[:6]:
                    if t["cost_flat"] is not None and t["cost_partitioned"] is not None:
                        lines.append(f"      {t['calls']:>5.0f} x {t['cost_flat']:>9.4g} -> "
                                     f"{t['cost_partitioned']:<9.4g}"
                                     f" ({t['partitions_scanned']}/{t['partitions_total']} partitions) "
                                     f"{t['label'][:60]}")
                if v.get("note"):
                    lines.append(f"    note: {v['note']}")
            else:
                lines.append(f"    the plan failed on a sample copy: {v.get('error')}")
        lines.append(f"    plan: pgpilot advise partitions --table {a.table} --format sql")
    if not lines:
        lines.append("No tables to consider (is there a logged workload?).")
    return "\n".join(lines) + "\n"


def _history(args, target, store) -> int:
    from advisors.advice_log import ensure_schema
    ensure_schema(store)
    rows = store.execute(
        """SELECT l.id, l.advised_at, l.kind, l.signature, l.confidence, c.checked_at, c.outcome, c.idx_scan,
                  c.cost_ratio, c.expected_ratio
           FROM pgpilot.advice_log l
           LEFT JOIN LATERAL (SELECT * FROM pgpilot.advice_checks c WHERE c.advice_id = l.id
                              ORDER BY checked_at DESC LIMIT 1) c ON true
           WHERE l.database = current_database() OR %s
           ORDER BY l.id DESC LIMIT 200""", (store is not target,)).fetchall()
    if args.format == "json":
        keys = ("id", "advised_at", "kind", "signature", "confidence", "checked_at", "outcome", "idx_scan",
                "cost_ratio", "expected_ratio")
        json.dump([dict(zip(keys, r)) for r in rows], sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    for r in rows:
        ratio = f" cost x{r[8]:.2f} (est. x{r[9]:.2f})" if r[8] is not None and r[9] is not None else ""
        print(f"{r[0]:>5} {r[1]:%Y-%m-%d %H:%M} {r[2]:<12} {r[3][:60]:<60} {r[6] or 'not checked yet'}"
              f"{'' if r[7] is None else f', {r[7]} scans'}{ratio}")
    if not rows:
        print("No advice recorded yet.")
    return 0
