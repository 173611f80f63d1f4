"""`pgpilot learn`: run the learner once or on an interval, print the workload report, or roll a model back.

    pgpilot learn [-c config.yaml] [--dsn STORE_DSN] --once | --every 10m | --report | --rollback KIND

--once and --every take a PostgreSQL advisory lock on the log store (pg_try_advisory_lock), so that only one
learner acts at a time: a second --once exits with status 3, a second --every stands by until the lock frees.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger("pgpilot.learn")

# pg_try_advisory_lock key of the learner: the bytes "pgplearn" as a bigint
LOCK_KEY = int.from_bytes(b"pgplearn", "big") & 0x7FFF_FFFF_FFFF_FFFF
EXIT_LOCKED = 3


def parse_interval(text: str) -> float:
    """Seconds in "90", "30s", "10m", "1h", "1d"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"not an interval: {text!r} (examples: 30s, 10m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def database_dsn(db) -> str:
    """A libpq URL for a proxy.config.Database entry."""
    auth = quote(db.user, safe="") + (":" + quote(db.password, safe="") if db.password else "")
    return f"postgresql://{auth}@{db.host}:{db.port}/{quote(db.dbname or '', safe='')}?sslmode={db.sslmode}"


def store_dsn_from(config, override: str | None) -> str | None:
    if override:
        return override
    if config.query_log.dsn:
        return config.query_log.dsn
    for db in config.databases.values():
        return database_dsn(db)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpilot learn", description="Train, evaluate and register pgpilot's models.")
    p.add_argument("-c", "--config", help="config.yaml (default: built-in defaults)")
    p.add_argument("--dsn", help="log store DSN (default: query_log.dsn, else the first database)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="one learning pass")
    mode.add_argument("--every", metavar="INTERVAL", nargs="?", const="", help="a pass every INTERVAL "
                      "(default: learning.interval)")
    mode.add_argument("--report", action="store_true", help="print the workload report and write it as JSON")
    mode.add_argument("--rollback", metavar="KIND", help="restore the previous champion of a model kind")
    p.add_argument("--json", metavar="PATH", help="also write the pass summary / report JSON here")
    p.add_argument("--model-dir", help="override learning.model_dir")
    p.add_argument("--no-collect", action="store_true", help="skip the collectors")
    p.add_argument("--search-budget", type=float, help="override learning.search_budget_seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="progress lines only for warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s learn: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from proxy.config import ConfigError, load_config
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"pgpilot learn: {e}", file=sys.stderr)
        return 2
    cfg = config.learning
    if args.search_budget:
        cfg = cfg.model_copy(update={"search_budget_seconds": args.search_budget})
    model_dir = args.model_dir or cfg.model_dir
    if args.rollback:
        return _rollback(model_dir, args.rollback)
    store = store_dsn_from(config, args.dsn)
    if not store:
        print("pgpilot learn: no log store: give --dsn, query_log.dsn or a database in the config", file=sys.stderr)
        return 2
    import psycopg
    try:
        conn = psycopg.connect(store, autocommit=True, application_name="pgpilot-learn")
    except psycopg.Error as e:
        print(f"pgpilot learn: cannot connect to the log store: {e}", file=sys.stderr)
        return 2
    with conn:
        if not _has_log(conn):
            print("pgpilot learn: the log store has no pgpilot.query_events yet (start the proxy with "
                  "query_log enabled)", file=sys.stderr)
            return 2
        if args.report:
            return _report(conn, cfg, model_dir, args.json)
        from learning.pipeline import LearnSettings
        targets = {name: database_dsn(db) for name, db in config.databases.items()}
        settings = LearnSettings(store, model_dir, cfg, targets, collect=not args.no_collect,
                                 eviction=config.cache.l1_eviction)
        if args.once:
            return _once(conn, settings, args.json)
        interval = parse_interval(args.every or cfg.interval)
        return _every(conn, settings, interval, args.json)


def _has_log(conn) -> bool:
    return conn.execute("SELECT to_regclass('pgpilot.query_events') IS NOT NULL").fetchone()[0]


def try_lock(conn) -> bool:
    return bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0])


def unlock(conn) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _once(conn, settings, json_path: str | None) -> int:
    from learning.pipeline import format_summary, learn_once, write_json
    if not try_lock(conn):
        print("pgpilot learn: another learner holds the lock on this log store; nothing done", file=sys.stderr)
        return EXIT_LOCKED
    try:
        summary = learn_once(settings, conn)
    finally:
        unlock(conn)
    print(format_summary(summary), end="")
    if json_path:
        write_json(Path(json_path), summary)
    failed = [k for k, m in summary.get("models", {}).items() if "error" in m]
    return 1 if failed else 0


def _every(conn, settings, interval: float, json_path: str | None) -> int:
    from learning.pipeline import format_summary, learn_once, write_json
    log.info("learning every %.0fs (Ctrl-C stops)", interval)
    holding = False
    try:
        while True:
            started = time.monotonic()
            if not holding:
                holding = try_lock(conn)
                if not holding:
                    log.info("another learner holds the lock; standing by")
            if holding:
                try:
                    summary = learn_once(settings, conn)
                except Exception:  # a failed pass (the store restarting...) must not end the loop
                    log.exception("learning pass failed; next try in %.0fs", interval)
                    if conn.closed or conn.broken:
                        return 2
                else:
                    print(format_summary(summary), end="", flush=True)
                    if json_path:
                        write_json(Path(json_path), summary)
            time.sleep(max(1.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        if holding and not conn.closed:
            unlock(conn)


def _report(conn, cfg, model_dir: str, json_path: str | None) -> int:
    from learning.analysis import analyze_workload, format_report
    from learning.pipeline import analysis_thresholds, load_window, write_json
    event_log = load_window(conn, cfg)
    report = analyze_workload(event_log, analysis_thresholds(cfg))
    print(format_report(report), end="")
    path = Path(json_path) if json_path else Path(model_dir) / "reports" / "workload.json"
    write_json(path, report)
    print(f"\nJSON report: {path}")
    return 0


def _rollback(model_dir: str, kind: str) -> int:
    from learning.registry import Registry, RegistryError
    from proxy.models import ModelRejected
    try:
        pointer = Registry(model_dir).rollback(kind)
    except (RegistryError, ModelRejected) as e:
        print(f"pgpilot learn: {e}", file=sys.stderr)
        return 1
    print(f"{kind} champion is now {pointer['sha256'][:12]}... (was {pointer['rolled_back_from'][:12]}...)")
    return 0
