"""What the proxy costs: pgbench -S through pgpilot against direct PostgreSQL and PgBouncer, side by side.

    python -m bench.proxy_overhead [--rounds 3] [--duration 10] [--clients 1,16] [--pin] [--json out.json] [--quick]

One private PostgreSQL cluster (fsync off) is initialised with `pgbench -i -s 10`. In front of it run PgBouncer
(the Debian package, transaction pooling) and pgpilot (transaction pooling; query log, anomaly scoring and
models off), both with the same
pool size (20 by default). For each round, for each query protocol (`-M simple`, `-M extended`,
`-M prepared`) and client count (`-c 1` for latency, `-c 16 -j 2` for throughput), `pgbench -S -T <duration>`
runs against direct PostgreSQL, PgBouncer and pgpilot, in an order that rotates by round (A B C, B C A, C A B,
...), so machine noise and position hit all three alike. `--pin` runs both proxies on the last CPU and Postgres,
pgbench and the benchmark on the others (bench.pinning), so that the load does not compete with the pooler; the
direct rows then show Postgres on the CPUs left, no longer the machine's limit.

The table shows, per protocol and client count: the median TPS of each target, the median average latency,
the ratios pgpilot/PgBouncer and pgpilot/direct (each the median of the per-round ratios, so a noisy round
cannot skew it), at -c 1 the latency each proxy adds per query (its latency minus direct, median over rounds),
and the CPU time each proxy process spent per transaction (from /proc, via psutil).

PgBouncer before 1.21 cannot keep named prepared statements in transaction mode; with such a version the
`-M prepared` rows use a second PgBouncer in session mode, marked `session*`. `--quick` is a smoke run of a few
seconds (scale 1, one round, 1 s per run, -c 1 and -c 4). `--json` writes every run and the summary.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil

from bench.pinning import Pinning
from bench.refs import PgBouncer
from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.services import PgCluster

PROTOCOLS = ["simple", "extended", "prepared"]
TARGETS = ["direct", "pgbouncer", "pgpilot"]
DBNAME = "bench"


@dataclass
class Run:
    round: int
    protocol: str
    clients: int
    target: str
    tps: float | None
    latency_ms: float | None
    transactions: int
    failed: int
    proxy_cpu_us_per_tx: float | None
    error: str | None = None


@dataclass
class Target:
    name: str
    host: str
    port: int
    pid: int | None = None          # the proxy process whose CPU time is measured
    note: str = ""


@dataclass
class Summary:
    protocol: str
    clients: int
    tps: dict[str, float | None] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    cpu_us_per_tx: dict[str, float | None] = field(default_factory=dict)
    pgpilot_vs_pgbouncer: float | None = None
    pgpilot_vs_direct: float | None = None
    added_latency_us: dict[str, float | None] = field(default_factory=dict)
    notes: str = ""


def pgbench(target: Target, protocol: str, clients: int, duration: float) -> dict:
    """One `pgbench -S` run; returns tps, latency, transactions and failures as pgbench reports them."""
    command = ["pgbench", "-n", "-S", "-M", protocol, "-c", str(clients), "-j", str(min(2, clients)),
               "-T", str(duration), "-h", target.host, "-p", str(target.port), "-U", "postgres", DBNAME]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    text = out.stdout

    def number(pattern: str, cast=float):
        m = re.search(pattern, text)
        return cast(m.group(1)) if m else None

    result = {
        "tps": number(r"tps = ([\d.]+) \(without initial connection time\)"),
        "latency_ms": number(r"latency average = ([\d.]+) ms"),
        "transactions": number(r"number of transactions actually processed: (\d+)", int) or 0,
        "failed": number(r"number of failed transactions: (\d+)", int) or 0,
        "error": None,
    }
    if out.returncode != 0 or result["tps"] is None:
        result["error"] = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        result["tps"] = None if out.returncode != 0 else result["tps"]
    return result


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[Run], protocols: list[str], client_counts: list[int], notes: dict) -> list[Summary]:
    rows = []
    for protocol in protocols:
        for clients in client_counts:
            mine = [r for r in runs if r.protocol == protocol and r.clients == clients]
            by = {t: [r for r in mine if r.target == t] for t in TARGETS}
            s = Summary(protocol, clients, notes=notes.get(protocol, ""))
            for t in TARGETS:
                s.tps[t] = median([r.tps for r in by[t]])
                s.latency_ms[t] = median([r.latency_ms for r in by[t] if r.tps is not None])
                s.cpu_us_per_tx[t] = median([r.proxy_cpu_us_per_tx for r in by[t] if r.tps is not None])
            rounds = sorted({r.round for r in mine})

            def per_round(fn):
                values = []
                for n in rounds:
                    one = {r.target: r for r in mine if r.round == n}
                    if all(t in one and one[t].tps for t in TARGETS):
                        values.append(fn(one))
                return median(values)

            s.pgpilot_vs_pgbouncer = per_round(lambda o: o["pgpilot"].tps / o["pgbouncer"].tps)
            s.pgpilot_vs_direct = per_round(lambda o: o["pgpilot"].tps / o["direct"].tps)
            if clients == 1:
                for proxy in ("pgbouncer", "pgpilot"):
                    s.added_latency_us[proxy] = per_round(
                        lambda o, p=proxy: (o[p].latency_ms - o["direct"].latency_ms) * 1000)
            rows.append(s)
    return rows


def fmt(value, spec: str = ".0f", missing: str = "fail") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[Summary]) -> None:
    header = (f"{'protocol':<9} {'clients':>7} | {'TPS direct':>10} {'pgbouncer':>10} {'pgpilot':>10} | "
              f"{'lat ms dir':>10} {'pgb':>6} {'pgp':>6} | {'pgp/pgb':>7} {'pgp/dir':>7} | "
              f"{'+us pgb':>7} {'+us pgp':>7} | {'cpu us/tx pgb':>13} {'pgp':>6}")
    print(header)
    print("-" * len(header))
    for s in rows:
        print(f"{s.protocol:<9} {s.clients:>7} | {fmt(s.tps['direct']):>10} {fmt(s.tps['pgbouncer']):>10} "
              f"{fmt(s.tps['pgpilot']):>10} | {fmt(s.latency_ms['direct'], '.3f'):>10} "
              f"{fmt(s.latency_ms['pgbouncer'], '.3f'):>6} {fmt(s.latency_ms['pgpilot'], '.3f'):>6} | "
              f"{fmt(s.pgpilot_vs_pgbouncer, '.2f', '-'):>7} {fmt(s.pgpilot_vs_direct, '.2f', '-'):>7} | "
              f"{fmt(s.added_latency_us.get('pgbouncer'), '.0f', ''):>7} "
              f"{fmt(s.added_latency_us.get('pgpilot'), '.0f', ''):>7} | "
              f"{fmt(s.cpu_us_per_tx['pgbouncer'], '.0f', '-'):>13} {fmt(s.cpu_us_per_tx['pgpilot'], '.0f', '-'):>6}"
              f"{'  ' + s.notes if s.notes else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10, help="seconds per pgbench run")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    parser.add_argument("--pool-size", type=int, default=20, help="backends per pool, the same for both proxies")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--pin", action="store_true",
                        help="both proxies on a CPU of their own, Postgres and pgbench on the others")
    parser.add_argument("--json", help="write every run and the summary here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.scale, args.clients = 1, 1, 1, "1,4"
    client_counts = [int(c) for c in args.clients.split(",")]
    protocols = args.protocols.split(",")
    duration = int(args.duration) if float(args.duration).is_integer() else args.duration

    pinning = Pinning(args.pin)      # before the cluster starts: its processes inherit the CPUs
    cluster = PgCluster().start()
    started: list = []
    try:
        cluster.psql(f"CREATE DATABASE {DBNAME}")
        print(f"pgbench -i -s {args.scale} on PostgreSQL at port {cluster.port} ...", flush=True)
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", cluster.host, "-p", str(cluster.port),
                        "-U", cluster.user, DBNAME], check=True, capture_output=True)

        with pinning.for_proxy():
            bouncer = PgBouncer(cluster.host, cluster.port, pool_size=args.pool_size).start()
        started.append(bouncer)
        bouncer_for = {p: bouncer for p in protocols}
        notes = {}
        if "prepared" in protocols and not bouncer.supports_prepared:
            with pinning.for_proxy():
                session_bouncer = PgBouncer(cluster.host, cluster.port, pool_mode="session",
                                            pool_size=args.pool_size).start()
            started.append(session_bouncer)
            bouncer_for["prepared"] = session_bouncer
            notes["prepared"] = "session*"
        # The pooler alone, as PgBouncer is: query log, anomaly scoring and models off (bench.querylog_overhead
        # and bench.models_overhead measure what those add).
        with pinning.for_proxy():
            pilot = ProxyProcess({"databases": {DBNAME: upstream_entry(cluster, DBNAME)}, "pool_size": args.pool_size,
                                  "pool_mode": "transaction", "log_level": "warning",
                                  "anomaly": {"enabled": False}, "models": {"enabled": False}}).start()
        started.append(pilot)

        version = ".".join(map(str, bouncer.version))
        print(f"direct :{cluster.port}  PgBouncer {version} :{bouncer.port}  pgpilot :{pilot.port}  "
              f"pool size {args.pool_size}, {args.rounds} round(s) of {duration}s runs; {pinning.describe()}",
              flush=True)
        runs: list[Run] = []
        for n in range(1, args.rounds + 1):
            for protocol in protocols:
                for clients in client_counts:
                    targets = [Target("direct", cluster.host, cluster.port),
                               Target("pgbouncer", bouncer.host, bouncer_for[protocol].port,
                                      bouncer_for[protocol].proc.pid),
                               Target("pgpilot", pilot.host, pilot.port, pilot.proc.pid)]
                    shift = (n - 1) % len(targets)
                    targets = targets[shift:] + targets[:shift]
                    for target in targets:
                        cpu_before = cpu_seconds(target.pid)
                        result = pgbench(target, protocol, clients, duration)
                        cpu_after = cpu_seconds(target.pid)
                        cpu_per_tx = None
                        if cpu_before is not None and result["transactions"]:
                            cpu_per_tx = (cpu_after - cpu_before) / result["transactions"] * 1e6
                        run = Run(n, protocol, clients, target.name, result["tps"], result["latency_ms"],
                                  result["transactions"], result["failed"], cpu_per_tx, result["error"])
                        runs.append(run)
                        status = f"{fmt(run.tps)} tps, {fmt(run.latency_ms, '.3f')} ms"
                        if run.error:
                            status += f"  ERROR: {run.error}"
                        print(f"[round {n}/{args.rounds}] -M {protocol:<8} -c {clients:<3} {target.name:<9} {status}",
                              flush=True)
                        if target.name == "pgpilot" and not pilot.alive():
                            raise RuntimeError(f"pgpilot died:\n{pilot.log()[-3000:]}")

        rows = summarize(runs, protocols, client_counts, notes)
        print()
        print_table(rows)
        if notes:
            print(f"\n* PgBouncer {version} has no prepared-statement support in transaction mode "
                  "(max_prepared_statements came in 1.21): its -M prepared rows ran in session mode.")
        print("pgp/pgb, pgp/dir: median of per-round TPS ratios; +us: latency added per query at -c 1 "
              "(median over rounds); cpu us/tx: proxy process CPU per transaction.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": vars(args), "pgbouncer_version": version, "notes": notes,
                           "runs": [asdict(r) for r in runs], "summary": [asdict(s) for s in rows],
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=2)
            print(f"wrote {args.json}")
        failed = [r for r in runs if r.error]
        return 1 if failed else 0
    finally:
        for proc in reversed(started):
            if isinstance(proc, PgBouncer):
                proc.destroy()
            else:
                proc.stop()
        cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
