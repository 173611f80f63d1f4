"""The learner's acceptance numbers on a mixed workload executed for real: pgbench + TPC-H + the synthetic application.

    python -m bench.learn_models [--quick] [--rounds 3] [--json out.json]
    python -m bench.learn_models --save-recording DIR ...   # keep the recorded cluster (log store, app, tpch)
    python -m bench.learn_models --recording DIR --rounds 1 # learn again from that recording, no re-recording

A throwaway PostgreSQL runs pgbench's TPC-B script, TPC-H (scale 0.1, when tpchgen-cli is installed) with
parameters drawn per the specification, and the synthetic application with labelled anomalies, each
statement timed and logged by bench.workloads.recorder. Then `learn_once` runs `--rounds` times over that log
(seeds 0, 1, ...) and the bench prints the medians of:
  time model    q-error (median, p90, p99) on held-out events vs the template mean and the Postgres-cost
                regression, on unseen parameter values, per database, and the repeat-noise floor
  anomalies     precision / recall per class for the served (distilled) model, its teacher, and an
                IsolationForest alone
  cache         DB time saved by never / always / model / oracle at several cache sizes
  serving       ONNX-vs-native max abs difference and onnxruntime microseconds per row, single and batched,
                with the IsolationForest converted as-is for comparison
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from bench.workloads import synthetic
from bench.workloads.recorder import TPCB_SCRIPT, Recorder, Statement, pgbench_script, virtual_start
from tests.support.services import PgCluster

log = logging.getLogger("bench.learn_models")


def record_workloads(cluster: PgCluster, args) -> dict:
    """Run the three workloads against their databases, logging into the store; returns per-workload counts."""
    store = cluster.dsn_for("store")
    app_dsn = cluster.dsn_for("app")
    out = {}
    total = args.app_statements + args.pgbench_tx * 7 + 22 * args.tpch_instances
    start = virtual_start(total, 20.0)
    log.info("synthetic application: scale %.2f, %d statements with anomalies", args.scale, args.app_statements)
    synthetic.setup(app_dsn, args.scale)
    app = synthetic.SyntheticApp(scale=args.scale, seed=args.seed)
    stream = list(synthetic.inject_anomalies(app.statements(args.app_statements, start), app, every=150,
                                             seed=args.seed + 1))
    span = max(st.ts for st in stream) - start   # the other workloads share the application's timeline
    with Recorder(app_dsn, store) as rec:
        out["synthetic"] = rec.run(stream).__dict__
    log.info("pgbench: %d TPC-B transactions", args.pgbench_tx)
    subprocess.run([str(cluster.bindir / "pgbench"), "-i", "-q", "-s", "1", "-h", cluster.host,
                    "-p", str(cluster.port), "-U", cluster.user, "app"], check=True, capture_output=True)
    with Recorder(app_dsn, store, proxy_id="pgbench") as rec:
        rng = random.Random(args.seed)
        stream = pgbench_script(TPCB_SCRIPT, scale=1, transactions=args.pgbench_tx, rng=rng, app="pgbench",
                                client_addr="10.0.9.10", start_ts=start, tps=args.pgbench_tx / span)
        out["pgbench"] = rec.run(stream).__dict__
    try:
        from bench.workloads.tpch import TEMPLATES, load_tpch
    except ImportError:
        log.warning("bench.workloads.tpch is not available: no TPC-H")
        return out
    log.info("TPC-H scale %.2f: loading", args.tpch_scale)
    cluster.psql("CREATE DATABASE tpch")
    tpch_dsn = cluster.dsn_for("tpch")
    try:
        load_tpch(tpch_dsn, args.tpch_scale)
    except Exception as e:  # tpchgen-cli missing or failing: the other workloads still make a log
        log.warning("TPC-H not loaded: %s", e)
        return out
    cluster.psql("VACUUM ANALYZE", dbname="tpch")
    rng = random.Random(args.seed)
    statements = []
    for i in range(args.tpch_instances):
        for q, template in TEMPLATES.items():
            statements.append(Statement(template(rng, scale=args.tpch_scale), None,
                                        ts=start + rng.uniform(0, span), app="analytics", client_addr="10.0.8.20",
                                        settings={"statement_timeout": "'20s'"}))
    statements.sort(key=lambda s: s.ts)
    log.info("TPC-H: %d queries", len(statements))
    with Recorder(tpch_dsn, store, proxy_id="tpch") as rec:
        out["tpch"] = rec.run(statements).__dict__
    return out


def save_recording(cluster: PgCluster, target: Path, counts: dict) -> None:
    """Copy the cluster's data directory (stopped for a consistent copy) and the workload counts to target."""
    cluster.stop()
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(cluster.datadir, target / "data", symlinks=True)
    (target / "counts.json").write_text(json.dumps(counts))
    cluster.start()
    log.info("recording saved to %s", target)


def start_from_recording(cluster: PgCluster, source: Path) -> dict:
    """Start `cluster` on a copy of a saved data directory; returns the saved workload counts."""
    cluster._tmp = tempfile.mkdtemp(prefix="pgpilot-pg-")
    cluster.datadir = Path(cluster._tmp) / "data"
    shutil.copytree(source / "data", cluster.datadir, symlinks=True)
    (cluster.datadir / "postmaster.pid").unlink(missing_ok=True)
    if os.geteuid() == 0:  # the server runs as the postgres system user (initdb refuses root)
        for root, dirs, files in os.walk(cluster._tmp):
            for name in dirs + files:
                shutil.chown(os.path.join(root, name), "postgres", "postgres")
        shutil.chown(cluster._tmp, "postgres", "postgres")
        cluster._as_user = ["runuser", "-u", "postgres", "--"]
    cluster.start()
    return json.loads((source / "counts.json").read_text())


def isolation_forest_cost(event_log, seed: int) -> dict:
    """onnxruntime cost of a 100-tree IsolationForest converted as-is, on the anomaly features."""
    from learning import anomaly as an
    from learning.export import export_onnx, inference_cost_us
    from learning.logdata import time_split
    train, test = time_split(event_log, 0.25)
    data = an.build_dataset(event_log, train, test, None, max_train_rows=20_000, max_test_rows=3000, seed=seed)
    teacher = an.fit_teacher(data.X_train, seed)
    onnx_bytes = export_onnx(teacher.forest, an.KIND, algorithm="isolation-forest", metrics={}, training_window={})
    return inference_cost_us(onnx_bytes, data.X_test[:1000], repeats=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke-sized run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--tpch-scale", type=float, default=0.1)
    p.add_argument("--app-statements", type=int, default=40_000)
    p.add_argument("--pgbench-tx", type=int, default=2_000)
    p.add_argument("--tpch-instances", type=int, default=12, help="instances of each of the 22 queries")
    p.add_argument("--budget", type=float, default=60.0, help="time model search budget (s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json")
    p.add_argument("--save-recording", metavar="DIR",
                   help="after recording, copy the stopped cluster's data directory (log store, app, tpch) to DIR")
    p.add_argument("--recording", metavar="DIR",
                   help="learn from a recording saved by --save-recording instead of recording the workloads")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.app_statements, args.pgbench_tx, args.tpch_instances, args.budget = 1, 8000, 300, 3, 10.0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cluster = PgCluster()
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-learn-models-"))
    try:
        if args.recording:
            counts = start_from_recording(cluster, Path(args.recording))
            log.info("recording %s: %s", args.recording, {k: v["events"] for k, v in counts.items()})
        else:
            cluster.start()
            for db in ("store", "app"):
                cluster.psql(f"CREATE DATABASE {db}")
            started = time.monotonic()
            counts = record_workloads(cluster, args)
            log.info("workloads recorded in %.0fs: %s", time.monotonic() - started,
                     {k: v["events"] for k, v in counts.items()})
            if args.save_recording:
                save_recording(cluster, Path(args.save_recording), counts)
        import psycopg

        from learning.logdata import load_log
        from learning.pipeline import LearnSettings, learn_once
        from proxy.config import LearningConfig
        cfg = LearningConfig(search_budget_seconds=args.budget, heavy_p50_ms=20.0)
        targets = {db: cluster.dsn_for(db) for db in ("app", "tpch")}
        rounds = []
        with psycopg.connect(cluster.dsn_for("store"), autocommit=True) as conn:
            for r in range(args.rounds):
                settings = LearnSettings(cluster.dsn_for("store"), str(tmp / "models"), cfg, targets,
                                         collect=(r == 0), seed=r)
                t = time.monotonic()
                summary = learn_once(settings, conn)
                log.info("round %d: learn_once %.0fs", r + 1, time.monotonic() - t)
                rounds.append(summary)
            iso = isolation_forest_cost(load_log(conn), 0)
        results = {"workloads": counts, "rounds": rounds, "isolation_forest_onnx": iso}
        print_results(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def _med(rounds: list, *path, default=float("nan")) -> float:
    values = []
    for r in rounds:
        v = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
            if v is None:
                break
        if isinstance(v, (int, float)):
            values.append(float(v))
    return statistics.median(values) if values else default


def print_results(results: dict) -> None:
    rounds = results["rounds"]
    n = len(rounds)
    print(f"\nworkloads: " + ", ".join(f"{k} {v['events']:,} events" for k, v in results["workloads"].items())
          + f"; {n} learning round(s), medians shown")
    t = [r["models"].get("time", {}) for r in rounds]
    print("\nTIME MODEL  q-error on held-out events (later in time)")
    print(f"{'predictor':<34}{'n':>8}{'median':>9}{'p90':>9}{'p99':>9}")
    rows = [("model (" + (t[0].get("family") or "?") + ")", ("time_split", "model")),
            ("template historical mean", ("time_split", "template_mean")),
            ("model, unseen parameter values", ("unseen_parameters", "model")),
            ("template mean, unseen parameters", ("unseen_parameters", "template_mean")),
            ("model, rows with a Postgres cost", ("cost_baseline", "model")),
            ("Postgres cost regression", ("cost_baseline", "postgres_cost")),
            ("template mean, same rows", ("cost_baseline", "template_mean")),
            ("repeat noise (same statement+params)", ("repeat_noise",))]
    for label, path in rows:
        print(f"{label:<34}{_med(t, *path, 'n'):>8.0f}{_med(t, *path, 'median'):>9.2f}{_med(t, *path, 'p90'):>9.2f}"
              f"{_med(t, *path, 'p99'):>9.2f}")
    for db in (t[0].get("by_database") or {}):
        print(f"{'  ' + db + ': model':<34}{_med(t, 'by_database', db, 'model', 'n'):>8.0f}"
              f"{_med(t, 'by_database', db, 'model', 'median'):>9.2f}{_med(t, 'by_database', db, 'model', 'p90'):>9.2f}"
              f"{_med(t, 'by_database', db, 'model', 'p99'):>9.2f}")
        print(f"{'  ' + db + ': template mean':<34}{_med(t, 'by_database', db, 'template_mean', 'n'):>8.0f}"
              f"{_med(t, 'by_database', db, 'template_mean', 'median'):>9.2f}"
              f"{_med(t, 'by_database', db, 'template_mean', 'p90'):>9.2f}"
              f"{_med(t, 'by_database', db, 'template_mean', 'p99'):>9.2f}")
    print(f"acceptance: median <= 1.5: {_med(t, 'time_split', 'model', 'median'):.2f}; p90 <= 3: "
          f"{_med(t, 'time_split', 'model', 'p90'):.2f}; beats both baselines at p90: "
          f"{_med(t, 'cost_baseline', 'model', 'p90') < _med(t, 'cost_baseline', 'postgres_cost', 'p90') and _med(t, 'time_split', 'model', 'p90') < _med(t, 'time_split', 'template_mean', 'p90')}")

    a = [r["models"].get("anomaly", {}) for r in rounds]
    print("\nANOMALIES  on the labelled injected events of the held-out window")
    print(f"{'detector':<36}{'precision':>10}{'recall':>8}{'f1':>7}")
    for label, path in (("served model (distilled)", ("student",)), ("teacher (rules + isolation)", ("teacher",)),
                        ("IsolationForest, its own threshold", ("isolation_forest", "auto_threshold")),
                        ("IsolationForest, best threshold", ("isolation_forest", "best_threshold_with_labels"))):
        print(f"{label:<36}{_med(a, *path, 'precision'):>10.3f}{_med(a, *path, 'recall'):>8.3f}"
              f"{_med(a, *path, 'f1'):>7.3f}")
    print(f"{'class':<18}{'labelled':>9}{'recall':>8}{'reason ok':>10}")
    for cls in (a[0].get("per_class") or {}):
        print(f"{cls:<18}{_med(a, 'per_class', cls, 'labelled'):>9.0f}{_med(a, 'per_class', cls, 'recall'):>8.3f}"
              f"{_med(a, 'per_class', cls, 'reason_matches'):>10.3f}")
    print(f"flag rate {100 * _med(a, 'flag_rate'):.2f}%, distillation: decision agreement "
          f"{_med(a, 'distillation', 'decision_agreement'):.4f}, max |student - teacher| "
          f"{_med(a, 'distillation', 'max_abs_diff'):.3f}")

    c = [r["models"].get("cache", {}) for r in rounds]
    print("\nCACHE  DB time saved (s) replaying the held-out trace; net = minus lookups and bytes stored;")
    print("       always and model evict by GDSF as the proxy's L1 does; *_lru: the same admission, LRU eviction")
    print(f"{'cache size':>11}{'never':>8}{'always':>8}{'model':>8}{'oracle':>8}{'model/oracle':>13}"
          f"{'always/oracle':>14}{'net always':>11}{'net model':>10}{'admit at':>9}{'model_lru/or':>13}"
          f"{'always_lru/or':>14}")

    def m(k, key):
        values = [x["simulation"][k].get(key) for x in c if x.get("simulation")]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")
    sizes = c[0].get("simulation") or []
    for k, row in enumerate(sizes):
        print(f"{100 * row['capacity_share']:>10.1f}%{m(k, 'never'):>8.2f}{m(k, 'always'):>8.2f}{m(k, 'model'):>8.2f}"
              f"{m(k, 'oracle'):>8.2f}{m(k, 'model_vs_oracle'):>13.2f}{m(k, 'always_vs_oracle'):>14.2f}"
              f"{m(k, 'always_net'):>11.2f}{m(k, 'model_net'):>10.2f}{m(k, 'threshold'):>9.2f}"
              f"{m(k, 'model_lru_vs_oracle'):>13.2f}{m(k, 'always_lru_vs_oracle'):>14.2f}")
    if n > 1 and sizes:
        print("per round: model/oracle always/oracle (the same with LRU eviction) at " + " / ".join(
            f"{100 * row['capacity_share']:g}%" for row in sizes))
        for r, x in enumerate(c):
            cells = [f"{s.get('model_vs_oracle', math.nan):.3f} {s.get('always_vs_oracle', math.nan):.3f} "
                     f"({s.get('model_lru_vs_oracle', math.nan):.3f} {s.get('always_lru_vs_oracle', math.nan):.3f})"
                     for s in x.get("simulation") or []]
            print(f"  round {r + 1}: " + " | ".join(cells))

    print("\nSERVING  ONNX vs native, onnxruntime one thread")
    print(f"{'model':<22}{'max |diff|':>12}{'us/row single':>15}{'us/row batched':>16}")
    for kind in ("time", "anomaly", "cache", "cluster"):
        ms = [r["models"].get(kind, {}) for r in rounds]
        print(f"{kind:<22}{_med(ms, 'onnx', 'max_abs_diff'):>12.2e}{_med(ms, 'onnx', 'single_us'):>15.1f}"
              f"{_med(ms, 'onnx', 'batched_us'):>16.1f}")
    iso = results.get("isolation_forest_onnx") or {}
    print(f"{'IsolationForest as-is':<22}{'':>12}{iso.get('single_us', float('nan')):>15.1f}"
          f"{iso.get('batched_us', float('nan')):>16.1f}")
    secs = [r.get("seconds", 0) for r in rounds]
    print(f"\nlearn_once took {statistics.median(secs):.0f}s (median of {n})")


if __name__ == "__main__":
    sys.exit(main())
