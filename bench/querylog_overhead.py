"""What query logging costs: pgbench -S through pgpilot with the query log on against the same pgpilot with it off.

    python -m bench.querylog_overhead [--quick] [--rounds 3] [--duration 10] [--json out.json]
    python -m bench.querylog_overhead --store-outage 30 [--outage-run 60] [--outage-protocol prepared] [--quick]

Overhead (the default): one private PostgreSQL cluster (fsync off) is initialised with `pgbench -i -s 10`. Two
pgpilot proxies run in front of it with the same configuration (transaction pooling, pool of 20) except that
one logs every statement (query_log on, the log store being the default: the first configured database, here
the pgbench database itself) and the other does not. For each round and each protocol (`-M simple`,
`-M extended`, `-M prepared`), `pgbench -S -c 16 -j 2 -T <duration>` runs through both, interleaved (which one
goes first alternates by round), so machine noise hits both alike. After a run through the logging proxy the
benchmark waits until its writer has stored every event, so the writer's CPU is counted in that run.

The table shows per protocol: the median TPS with logging on and off, the median of the per-round ratios on/off
(target >= 0.95), the proxy process's CPU time per transaction in each mode (psutil) and the median per-round
difference, and whether the log holds exactly pgbench's statements (transactions + 2 setup queries).

Store outage (`--store-outage SECONDS`): the log store is a second private cluster (query_log.dsn). pgbench runs
the TPC-B script (`-c 16 -j 2 -T <outage-run>`) through a logging proxy with its default writer settings; in the
middle of the run the store is stopped for SECONDS, then started again. Reported: pgbench's transactions and
failures, TPS before, during and after the outage (pgbench -P), the statements pgbench ran (7 per transaction
+ 2), those logged in the store, those counted as dropped, the difference (must be 0), what went through the
spool, and how long the replay took once the store was back.

`--quick` is a smoke run of a few seconds (overhead: scale 1, one round, 2 s runs; outage: a 12 s run with an
outage of at most 6 s). `--json` writes every run and the summary.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import psycopg

from bench.proxy_overhead import cpu_seconds, fmt, median
from tests.querylog_e2e.pgbench_log import (
    PgbenchResult, client_env, log_settled, parse_pgbench, pgbench_command, querylog_metrics,
)
from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.services import PgCluster

PROTOCOLS = ["simple", "extended", "prepared"]
MODES = ["on", "off"]
DBNAME = "bench"
APP = "bench-querylog"
SETUP_QUERIES = 2           # pgbench's own queries before a built-in script (scale, partitioning)
TPCB_STATEMENTS = 7         # BEGIN, 3 UPDATEs, SELECT, INSERT, END


@dataclass
class Run:
    round: int
    protocol: str
    mode: str
    tps: float | None
    transactions: int
    failed: int
    proxy_cpu_us_per_tx: float | None
    store_cpu_us_per_tx: float | None  # the log writer's Postgres backend (logging on)
    logged: int | None               # rows the writer stored for this run (logging on)
    drain_seconds: float | None      # from pgbench's end until the writer had stored everything
    error: str | None = None


@dataclass
class Summary:
    protocol: str
    tps: dict[str, float | None] = field(default_factory=dict)
    cpu_us_per_tx: dict[str, float | None] = field(default_factory=dict)
    store_cpu_us_per_tx: float | None = None
    on_vs_off: float | None = None
    added_cpu_us_per_tx: float | None = None
    logged_exactly: bool = False


def settle(proxy, timeout: float = 300.0) -> float:
    """Wait until the proxy's writer has stored (or dropped) every event; returns the seconds it took."""
    start = time.monotonic()
    while not log_settled(querylog_metrics(proxy)):
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the query log did not settle in {timeout}s: {querylog_metrics(proxy)}")
        time.sleep(0.05)
    return time.monotonic() - start


def pgbench(proxy, *args: str, timeout: float) -> PgbenchResult:
    out = subprocess.run(pgbench_command(proxy.host, proxy.port, DBNAME, *args), env=client_env(APP),
                         capture_output=True, text=True, timeout=timeout)
    return parse_pgbench(out.returncode, out.stdout, out.stderr)


def error_of(result) -> str | None:
    if result.returncode == 0 and result.tps is not None and not result.failed:
        return None
    return (result.stderr.strip().splitlines() or [f"exit {result.returncode}, {result.failed} failed"])[-1]


def start_cluster(scale: int) -> PgCluster:
    cluster = PgCluster().start()
    cluster.psql(f"CREATE DATABASE {DBNAME}")
    print(f"pgbench -i -s {scale} on PostgreSQL at port {cluster.port} ...", flush=True)
    subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", cluster.host, "-p", str(cluster.port),
                    "-U", cluster.user, DBNAME], check=True, capture_output=True)
    return cluster


# ---------------------------------------------------------------- overhead: logging on vs off


def measure_overhead(args, protocols: list[str]) -> tuple[list[Run], list[Summary]]:
    cluster = start_cluster(args.scale)
    spool = tempfile.mkdtemp(prefix="pgpilot-bench-spool-")
    proxies: dict[str, ProxyProcess] = {}
    try:
        common = {"databases": {DBNAME: upstream_entry(cluster, DBNAME)}, "pool_size": args.pool_size,
                  "pool_mode": "transaction", "log_level": "warning"}
        proxies["on"] = ProxyProcess({**common, "query_log": {"enabled": True, "spool_dir": spool}}).start()
        proxies["off"] = ProxyProcess({**common, "query_log": {"enabled": False}}).start()
        print(f"pgpilot logging on :{proxies['on'].port}, off :{proxies['off'].port}, pool size {args.pool_size}, "
              f"{args.rounds} round(s) of {args.duration}s runs, pgbench -S -c {args.clients} -j 2", flush=True)
        runs: list[Run] = []
        for n in range(1, args.rounds + 1):
            for protocol in protocols:
                for mode in (MODES if n % 2 else MODES[::-1]):
                    run = one_overhead_run(proxies[mode], cluster, n, protocol, mode, args)
                    runs.append(run)
                    status = f"{fmt(run.tps)} tps, {fmt(run.proxy_cpu_us_per_tx, '.1f', '-')} us cpu/tx"
                    if run.store_cpu_us_per_tx is not None:
                        status += f" (+ {run.store_cpu_us_per_tx:.1f} in the store's writer backend)"
                    if run.logged is not None:
                        status += (f", logged {run.logged}/{run.transactions + SETUP_QUERIES}"
                                   f" (drained in {run.drain_seconds:.2f}s)")
                    if run.error:
                        status += f"  ERROR: {run.error}"
                    print(f"[round {n}/{args.rounds}] -M {protocol:<8} logging {mode:<3} {status}", flush=True)
                    if not proxies[mode].alive():
                        raise RuntimeError(f"pgpilot (logging {mode}) died:\n{proxies[mode].log()[-3000:]}")
        return runs, summarize(runs, protocols)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        cluster.destroy()
        shutil.rmtree(spool, ignore_errors=True)


def writer_backend(cluster: PgCluster) -> int | None:
    """The pid of the log writer's backend on the store (application_name pgpilot-querylog), if connected."""
    with psycopg.connect(cluster.dsn_for(DBNAME), autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgpilot-querylog'").fetchone()
    return row[0] if row else None


def one_overhead_run(proxy: ProxyProcess, cluster: PgCluster, n: int, protocol: str, mode: str, args) -> Run:
    logging = mode == "on"
    written_before = querylog_metrics(proxy)["rows_written"] if logging else None
    writer = writer_backend(cluster) if logging else None
    store_before = cpu_seconds(writer)
    cpu_before = cpu_seconds(proxy.proc.pid)
    result = pgbench(proxy, "-S", "-M", protocol, "-c", str(args.clients), "-j", "2", "-T", str(args.duration),
                     timeout=args.duration + 120)
    drain = settle(proxy) if logging else None
    cpu_after = cpu_seconds(proxy.proc.pid)
    store_after = cpu_seconds(writer) if writer is not None and writer == writer_backend(cluster) else None
    transactions = result.processed or 0
    cpu_per_tx = (cpu_after - cpu_before) / transactions * 1e6 if transactions else None
    store_per_tx = (store_after - store_before) / transactions * 1e6 if transactions and store_after else None
    logged = int(querylog_metrics(proxy)["rows_written"] - written_before) if logging else None
    return Run(n, protocol, mode, result.tps if result.returncode == 0 else None, transactions,
               result.failed or 0, cpu_per_tx, store_per_tx, logged, drain, error_of(result))


def summarize(runs: list[Run], protocols: list[str]) -> list[Summary]:
    rows = []
    for protocol in protocols:
        mine = [r for r in runs if r.protocol == protocol]
        s = Summary(protocol)
        for mode in MODES:
            ok = [r for r in mine if r.mode == mode and r.tps is not None]
            s.tps[mode] = median([r.tps for r in ok])
            s.cpu_us_per_tx[mode] = median([r.proxy_cpu_us_per_tx for r in ok])
        s.store_cpu_us_per_tx = median([r.store_cpu_us_per_tx for r in mine if r.mode == "on" and r.tps])
        ratios, added = [], []
        for n in sorted({r.round for r in mine}):
            one = {r.mode: r for r in mine if r.round == n}
            if all(m in one and one[m].tps for m in MODES):
                ratios.append(one["on"].tps / one["off"].tps)
                added.append(one["on"].proxy_cpu_us_per_tx - one["off"].proxy_cpu_us_per_tx)
        s.on_vs_off = median(ratios)
        s.added_cpu_us_per_tx = median(added)
        logged = [r for r in mine if r.mode == "on"]
        s.logged_exactly = bool(logged) and all(r.logged == r.transactions + SETUP_QUERIES for r in logged)
        rows.append(s)
    return rows


def print_overhead(rows: list[Summary]) -> None:
    header = (f"{'protocol':<9} | {'TPS on':>8} {'off':>8} | {'on/off':>6} | {'cpu us/tx on':>12} {'off':>6} "
              f"{'added':>6} | {'store us/tx':>11} | {'log exact':>9}")
    print(header)
    print("-" * len(header))
    for s in rows:
        print(f"{s.protocol:<9} | {fmt(s.tps['on']):>8} {fmt(s.tps['off']):>8} | "
              f"{fmt(s.on_vs_off, '.3f', '-'):>6} | {fmt(s.cpu_us_per_tx['on'], '.1f', '-'):>12} "
              f"{fmt(s.cpu_us_per_tx['off'], '.1f', '-'):>6} {fmt(s.added_cpu_us_per_tx, '.1f', '-'):>6} | "
              f"{fmt(s.store_cpu_us_per_tx, '.1f', '-'):>11} | {'yes' if s.logged_exactly else 'NO':>9}")
    print("on/off: median of per-round TPS ratios (target >= 0.95); cpu us/tx: proxy process CPU per transaction "
          "(the log writer's included); added: median per-round on - off; store us/tx: CPU of the writer's Postgres "
          "backend (COPY, index upkeep) per transaction; log exact: every run's logged rows "
          "== transactions + 2 setup queries.")


# ---------------------------------------------------------------- the store stopped during a run


@dataclass
class OutageReport:
    protocol: str
    run_seconds: int
    outage_seconds: int
    outage_started_at: float | None = None     # seconds after pgbench started
    outage_ended_at: float | None = None
    pgbench_exit: int | None = None
    transactions: int = 0
    failed: int | None = None
    tps_before: float | None = None
    tps_during: float | None = None
    tps_after: float | None = None
    statements: int = 0                       # what pgbench ran: 7 per transaction + 2 setup queries
    logged: int = 0                           # rows of this run in the store
    dropped: int = 0
    spooled: int = 0
    replayed: int = 0
    peak_spool_bytes: int = 0
    replay_seconds: float | None = None       # from the store's restart until every event was settled
    # Proxy CPU per statement submitted, and its share of one core, before / during / after the outage (the
    # last phase runs until the spool is replayed).
    proxy_cpu_us_per_statement: dict[str, float | None] = field(default_factory=dict)
    proxy_cpu_percent: dict[str, float | None] = field(default_factory=dict)
    progress: list[dict] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return self.statements - self.logged - self.dropped


def measure_outage(args) -> OutageReport:
    report = OutageReport(args.outage_protocol, args.outage_run, args.store_outage)
    cluster = start_cluster(args.scale)
    store = PgCluster().start()
    spool = tempfile.mkdtemp(prefix="pgpilot-bench-spool-")
    proxy = None
    try:
        store.psql("CREATE DATABASE store")
        store_dsn = store.dsn_for("store")
        proxy = ProxyProcess({
            "databases": {DBNAME: upstream_entry(cluster, DBNAME)}, "pool_size": args.pool_size,
            "pool_mode": "transaction", "log_level": "warning",
            "query_log": {"enabled": True, "dsn": store_dsn, "spool_dir": spool}}).start()
        outage_at = (args.outage_run - args.store_outage) / 2
        print(f"pgbench TPC-B -M {args.outage_protocol} -c {args.clients} -j 2 -T {args.outage_run} through "
              f"pgpilot :{proxy.port}; log store :{store.port} stopped from {outage_at:.0f}s for "
              f"{args.store_outage}s", flush=True)
        client = subprocess.Popen(
            pgbench_command(proxy.host, proxy.port, DBNAME, "-M", args.outage_protocol, "-c", str(args.clients),
                            "-j", "2", "-T", str(args.outage_run), "-P", "1"),
            env=client_env(APP), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        output: dict[str, str] = {}
        reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), client.communicate())))
        reader.start()
        restarted_at = None
        samples: list[tuple[float, float, float]] = []    # (seconds since start, proxy CPU seconds, submitted)
        next_sample = 0.0
        while reader.is_alive():
            elapsed = time.monotonic() - started
            if report.outage_started_at is None and elapsed >= outage_at:
                store.stop()
                report.outage_started_at = time.monotonic() - started
                print(f"  {report.outage_started_at:5.1f}s  log store stopped", flush=True)
            elif (report.outage_started_at is not None and report.outage_ended_at is None
                  and elapsed >= report.outage_started_at + args.store_outage):
                store.start()
                restarted_at = time.monotonic()
                report.outage_ended_at = restarted_at - started
                print(f"  {report.outage_ended_at:5.1f}s  log store started again", flush=True)
            if elapsed >= next_sample:
                m = querylog_metrics(proxy)
                samples.append((elapsed, cpu_seconds(proxy.proc.pid), m["events_submitted"]))
                report.peak_spool_bytes = max(report.peak_spool_bytes, int(m["spool_bytes"]))
                if len(samples) % 5 == 1:
                    print(f"  {elapsed:5.1f}s  submitted {m['events_submitted']:.0f} written {m['rows_written']:.0f} "
                          f"spooled {m['rows_spooled']:.0f} replayed {m['rows_replayed']:.0f} "
                          f"dropped {m['rows_dropped']:.0f} spool {m['spool_bytes'] / 1e6:.1f} MB", flush=True)
                next_sample += 1
            time.sleep(0.1)
        reader.join()
        if report.outage_ended_at is None:     # a run shorter than planned: bring the store back anyway
            store.start()
            restarted_at = time.monotonic()
        result = parse_pgbench(client.returncode, output["stdout"], output["stderr"])
        settle(proxy, timeout=600)
        report.replay_seconds = time.monotonic() - restarted_at
        m = querylog_metrics(proxy)
        samples.append((time.monotonic() - started, cpu_seconds(proxy.proc.pid), m["events_submitted"]))
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            report.logged = conn.execute("SELECT count(*) FROM pgpilot.query_events WHERE application_name = %s",
                                         (APP,)).fetchone()[0]
        report.pgbench_exit, report.failed = result.returncode, result.failed
        report.transactions = result.processed or 0
        report.statements = TPCB_STATEMENTS * report.transactions + SETUP_QUERIES
        report.dropped, report.spooled, report.replayed = (int(m["rows_dropped"]), int(m["rows_spooled"]),
                                                           int(m["rows_replayed"]))
        report.progress = [{"t": float(t), "tps": float(tps)}
                           for t, tps in re.findall(r"progress: ([\d.]+) s, ([\d.]+) tps", result.stderr)]
        if report.outage_started_at is not None and report.outage_ended_at is not None:
            a, b = report.outage_started_at, report.outage_ended_at
            report.tps_before = median([p["tps"] for p in report.progress if p["t"] <= a])
            report.tps_during = median([p["tps"] for p in report.progress if a + 1 < p["t"] <= b])
            report.tps_after = median([p["tps"] for p in report.progress if p["t"] > b + 1])
            for phase, lo, hi in (("before", 1, a), ("during", a, b), ("after", b, samples[-1][0])):
                report.proxy_cpu_us_per_statement[phase], report.proxy_cpu_percent[phase] = phase_cpu(samples, lo, hi)
        if result.returncode != 0:
            print(result.report(), flush=True)
        return report
    finally:
        if proxy is not None:
            proxy.stop()
        store.destroy()
        cluster.destroy()
        shutil.rmtree(spool, ignore_errors=True)


def phase_cpu(samples: list[tuple[float, float, float]], lo: float, hi: float) -> tuple[float | None, float | None]:
    """Proxy CPU microseconds per statement submitted, and CPU percent of one core, between two sample times."""
    inside = [x for x in samples if lo <= x[0] <= hi]
    if len(inside) < 2:
        return None, None
    (t0, cpu0, n0), (t1, cpu1, n1) = inside[0], inside[-1]
    return ((cpu1 - cpu0) / (n1 - n0) * 1e6 if n1 > n0 else None), (cpu1 - cpu0) / (t1 - t0) * 100


def print_outage(r: OutageReport) -> None:
    print(f"pgbench TPC-B -M {r.protocol}, {r.run_seconds}s run, log store stopped "
          f"{fmt(r.outage_started_at, '.0f', '?')}s..{fmt(r.outage_ended_at, '.0f', '?')}s")
    rows = [
        ("pgbench exit code / failed transactions", f"{r.pgbench_exit} / {r.failed}"),
        ("transactions", r.transactions),
        ("TPS before / during / after the outage (median of 1 s)",
         f"{fmt(r.tps_before)} / {fmt(r.tps_during)} / {fmt(r.tps_after)}"),
        ("proxy CPU us/statement before / during / after (to replayed)", " / ".join(
            fmt(r.proxy_cpu_us_per_statement.get(p), ".1f", "-") for p in ("before", "during", "after"))),
        ("proxy CPU % of a core before / during / after", " / ".join(
            fmt(r.proxy_cpu_percent.get(p), ".0f", "-") for p in ("before", "during", "after"))),
        ("statements pgbench ran (7 x transactions + 2)", r.statements),
        ("logged in the store", r.logged),
        ("dropped (pgpilot_querylog_rows_dropped)", r.dropped),
        ("missing (statements - logged - dropped; must be 0)", r.missing),
        ("spooled / replayed rows", f"{r.spooled} / {r.replayed}"),
        ("peak spool size", f"{r.peak_spool_bytes / 1e6:.1f} MB"),
        ("store back to everything stored", f"{fmt(r.replay_seconds, '.1f', '?')} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.querylog_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--store-outage", type=int, metavar="SECONDS",
                        help="instead: stop the log store for SECONDS in the middle of a TPC-B run")
    parser.add_argument("--outage-run", type=int, default=60, help="seconds of the TPC-B run with --store-outage")
    parser.add_argument("--outage-protocol", default="prepared", choices=PROTOCOLS)
    parser.add_argument("--json", help="write every run and the summary here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.scale = 1, 2, 1
        args.outage_run = 12
        if args.store_outage is not None:
            args.store_outage = min(args.store_outage, 6)

    if args.store_outage is not None:
        if args.store_outage >= args.outage_run:
            parser.error("--store-outage must be shorter than --outage-run")
        report = measure_outage(args)
        print()
        print_outage(report)
        if args.json:
            write_json(args, {"outage": {**asdict(report), "missing": report.missing}})
        return 0 if report.missing == 0 and report.pgbench_exit == 0 and not report.failed else 1

    protocols = args.protocols.split(",")
    runs, rows = measure_overhead(args, protocols)
    print()
    print_overhead(rows)
    if args.json:
        write_json(args, {"runs": [asdict(r) for r in runs], "summary": [asdict(s) for s in rows]})
    return 1 if any(r.error for r in runs) or not all(s.logged_exactly for s in rows) else 0


def write_json(args, payload: dict) -> None:
    with open(args.json, "w") as f:
        json.dump({"settings": vars(args), **payload, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
