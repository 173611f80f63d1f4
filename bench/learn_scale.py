"""How long `pgpilot learn --once` takes on a large query log (default 1,000,000 events; the target is < 5 minutes).

    python -m bench.learn_scale [--events 1000000] [--rounds 1] [--json out.json]

A throwaway PostgreSQL gets the synthetic application's tables (for the Postgres-cost baseline's EXPLAINs) and
a log of simulated events with labelled anomalies, COPYed in by bench.workloads.recorder. Each round then runs
the learner as the command line would (a subprocess, default configuration) and reports its wall time, the
time of each step and the models' headline numbers. The reference in the same run is `pgpilot learn --report`
(load and analysis only) over the same log, interleaved with the full passes.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.workloads import synthetic
from bench.workloads.recorder import Recorder, virtual_start
from tests.support.services import PgCluster

log = logging.getLogger("bench.learn_scale")
TARGET_SECONDS = 300.0


def generate(dsn: str, events: int, scale: float, seed: int) -> dict:
    """Fill the store with `events` simulated statements (anomalies included); returns counts and seconds."""
    app = synthetic.SyntheticApp(scale=scale, seed=seed)
    rate = 20.0
    stream = synthetic.inject_anomalies(app.statements(events, virtual_start(events, rate)), app, every=1500,
                                        seed=seed + 1)
    started = time.monotonic()
    with Recorder(None, dsn, simulator=app.simulate, database="store", batch_size=20_000,
                  progress_every=15.0) as recorder:
        summary = recorder.run(stream, limit=events)
    return {"events": summary.events, "labelled": summary.labelled, "seconds": time.monotonic() - started}


def run_learner(config: Path, mode: str, json_out: Path) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "pgpilot", "learn", "-c", str(config), mode, "--json", str(json_out)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.monotonic() - started, proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=1, help="full learning passes (each interleaved with a report)")
    p.add_argument("--scale", type=float, default=0.2, help="synthetic application scale")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cluster = PgCluster().start()
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-learn-scale-"))
    try:
        cluster.psql("CREATE DATABASE store")
        dsn = cluster.dsn_for("store")
        log.info("creating the application tables (scale %.2f)", args.scale)
        synthetic.setup(dsn, args.scale)
        log.info("generating %d events", args.events)
        gen = generate(dsn, args.events, args.scale, args.seed)
        log.info("generated %d events in %.0fs", gen["events"], gen["seconds"])
        cluster.psql("VACUUM ANALYZE", dbname="store")
        config = tmp / "config.yaml"
        config.write_text(json.dumps({
            "query_log": {"dsn": dsn},
            "databases": {"store": {"host": cluster.host, "port": cluster.port, "user": cluster.user}},
            "learning": {"model_dir": str(tmp / "models")}}))
        rounds = []
        for r in range(args.rounds):
            report_s, code_r, _ = run_learner(config, "--report", tmp / f"report{r}.json")
            log.info("round %d: --report took %.1fs", r + 1, report_s)
            learn_s, code, output = run_learner(config, "--once", tmp / f"learn{r}.json")
            log.info("round %d: --once took %.1fs (exit %d)", r + 1, learn_s, code)
            if code not in (0, 1):
                print(output[-3000:], file=sys.stderr)
                return 1
            summary = json.loads((tmp / f"learn{r}.json").read_text())
            rounds.append({"learn_s": learn_s, "report_s": report_s, "exit": code, "summary": summary})
        print_results(gen, rounds)
        if args.json:
            Path(args.json).write_text(json.dumps({"generation": gen, "rounds": rounds}, indent=2, default=str))
        return 0 if all(r["learn_s"] < TARGET_SECONDS for r in rounds) else 2
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def print_results(gen: dict, rounds: list[dict]) -> None:
    learn = statistics.median(r["learn_s"] for r in rounds)
    report = statistics.median(r["report_s"] for r in rounds)
    last = rounds[-1]["summary"]
    print(f"\nlog: {gen['events']:,} events ({gen['labelled']} labelled anomalies), generated and COPYed in "
          f"{gen['seconds']:.0f}s")
    print(f"{'':<28}{'median s':>10}{'rounds':>8}")
    print(f"{'pgpilot learn --report':<28}{report:>10.1f}{len(rounds):>8}")
    print(f"{'pgpilot learn --once':<28}{learn:>10.1f}{len(rounds):>8}   target < {TARGET_SECONDS:.0f}s: "
          f"{'met' if learn < TARGET_SECONDS else 'MISSED'}")
    print(f"\n{'step':<10}{'seconds':>9}  detail (last round)")
    for s in last.get("steps", []):
        print(f"{s['step']:<10}{s['seconds']:>9.1f}  {s['detail']}")


if __name__ == "__main__":
    sys.exit(main())
