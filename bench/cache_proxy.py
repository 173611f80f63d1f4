"""The result cache through the real proxy: read-mostly throughput, hit latency of a heavy query, hit ratio and
Postgres time saved against an oracle, all with real clients.

    python -m bench.cache_proxy [--quick] [--rounds 3] [--seconds 10] [--clients 16] [--json out.json]

One private PostgreSQL cluster (fsync off) and one private Redis. Targets: PostgreSQL directly, pgpilot without
the cache, pgpilot with the cache (same pool size; query log and anomaly scoring off in both, so they differ
only by the cache).

(a) Read-mostly pgbench (`-f`, `-M prepared` by default): 95% reads of one of 10,000 rows drawn with
    `random_zipfian(1, 10000, 1.1)`, 5% updates of a row drawn the same way. Two scenarios: the updates go to
    another table (`elsewhere`: a catalog read while stock moves) or to the table read (`same table`: the cache
    invalidates per table, so each update retires every cached row of it). Per round and scenario the targets
    run one after the other (direct, pgpilot, pgpilot+cache); the table shows median TPS, the median of the
    per-round ratios, and the cache's hit ratio during its runs.
(b) A heavy aggregate (~50 ms on Postgres): one client times many executions; p50/p99 of cache hits (each one
    checked to be a hit) against the same statement direct and through pgpilot without the cache, and the
    client's floor (`SELECT 1` direct).
(c) A logged trace: pgpilot with the cache and `query_log` (with parameters) runs each scenario once (`-M simple`,
    since only simple-protocol events carry their values in the log); the trace read back from
    pgpilot.query_events is replayed through two simulated caches, both unbounded and admitting everything:
    `per-table` invalidates as pgpilot does (a write retires every result read from its table), `oracle` knows
    which future writes change a result (here: a write to the same row, the statement's `id` parameter).
    pgpilot's own hits are read from the trace (cache_outcome = 'hit'). DB time saved: per hit, the median
    duration of that template's executions on Postgres in the same trace.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import psycopg

from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.services import PgCluster, RedisServer

DBNAME = "bench"
STORE = "store"          # the query log's database: its DDL (partitions) stays out of the cached database's catalog
HOT_ROWS = 10_000
TARGETS = ("direct", "pgpilot", "pgpilot+cache")
SCENARIOS = {
    "elsewhere": "UPDATE stock SET qty = qty - 1 WHERE id = :id;",
    "same table": "UPDATE items SET price = price + 0.01 WHERE id = :id;",
}
READ = "SELECT id, name, price, descr FROM items WHERE id = :id;"
HEAVY = "SELECT day, count(*), sum(amount), avg(qty) FROM sales GROUP BY day ORDER BY day"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def script(update: str, zipf: float, read_percent: int) -> str:
    return (f"\\set id random_zipfian(1, {HOT_ROWS}, {zipf})\n"
            f"\\set r random(1, 100)\n"
            f"\\if :r <= {read_percent}\n{READ}\n\\else\n{update}\n\\endif\n")


# ------------------------------------------------------------------------------------------- setup

def create_schema(cluster: PgCluster, heavy_target_ms: float, max_sales_rows: int) -> tuple[int, float]:
    """Items, stock and a sales table sized so that HEAVY takes about heavy_target_ms: (sales rows, ms)."""
    cluster.psql(f"CREATE DATABASE {DBNAME}")
    cluster.psql(f"CREATE DATABASE {STORE}")
    cluster.psql(f"""
        CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10, 2) NOT NULL, descr text);
        INSERT INTO items SELECT g, 'item ' || g, (g % 997) / 10.0, repeat(md5(g::text), 3)
        FROM generate_series(1, {HOT_ROWS}) g;
        CREATE TABLE stock (id int PRIMARY KEY, qty bigint NOT NULL);
        INSERT INTO stock SELECT g, 1000000 FROM generate_series(1, {HOT_ROWS}) g;
        CREATE TABLE sales (id bigserial PRIMARY KEY, day date NOT NULL, item int NOT NULL, qty int NOT NULL,
                            amount numeric(12, 2) NOT NULL, note text);
    """, dbname=DBNAME)
    cluster.psql("VACUUM ANALYZE items", dbname=DBNAME)
    cluster.psql("VACUUM ANALYZE stock", dbname=DBNAME)
    rows, ms = 0, 0.0
    step = 20_000
    with psycopg.connect(cluster.dsn_for(DBNAME), autocommit=True) as conn:
        while rows < max_sales_rows and ms < heavy_target_ms * 0.9:
            conn.execute(f"""INSERT INTO sales (day, item, qty, amount, note)
                SELECT date '2024-01-01' + (g % 90), g % {HOT_ROWS} + 1, g % 7 + 1, (g % 10007) / 100.0,
                       md5(g::text) FROM generate_series({rows + 1}, {rows + step}) g""")
            rows += step
            conn.execute("VACUUM ANALYZE sales")
            ms = statement_ms(conn, HEAVY, 7)
            # the time grows about linearly with the rows: aim straight at the target, in one or two steps
            step = max(10_000, min(int(rows * (heavy_target_ms / max(ms, 0.1) - 1)), max_sales_rows - rows))
    return rows, ms


def statement_ms(conn, sql: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn.execute(sql).fetchall()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def pilot(cluster: PgCluster, pool_size: int, cache: dict | None, query_log: dict | None = None,
          profile: str | None = None) -> ProxyProcess:
    """pgpilot in front of the bench database, measuring the pooler and the cache alone: anomaly scoring off, and
    no served models (every run admits by the heuristic, whatever a learner left in the registry). `profile`:
    write a cProfile of the process there when it stops."""
    config = {"databases": {DBNAME: upstream_entry(cluster, DBNAME)}, "pool_size": pool_size, "log_level": "warning",
              "cache": cache or {"enabled": False}, "query_log": query_log or {"enabled": False},
              "models": {"enabled": False}, "anomaly": {"enabled": False}}
    return ProxyProcess(config, env={"PGPILOT_PROFILE": profile} if profile else None).start()


def cache_section(redis: RedisServer) -> dict:
    return {"enabled": True, "redis_url": redis.url, "key_prefix": f"bench{uuid.uuid4().hex[:6]}:"}


def cache_stats(proxy: ProxyProcess) -> dict[str, float]:
    """SHOW CACHE from the admin console, numeric rows only."""
    with psycopg.connect(f"host={proxy.host} port={proxy.port} user=postgres dbname=pgpilot", autocommit=True) as c:
        rows = psycopg.ClientCursor(c).execute("SHOW CACHE").fetchall()
    out = {}
    for name, value, _ in rows:
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def wait_serving(proxy: ProxyProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(f"host={proxy.host} port={proxy.port} user=postgres dbname=pgpilot",
                             autocommit=True) as c:
            rows = dict((r[0], r[1]) for r in psycopg.ClientCursor(c).execute("SHOW CACHE").fetchall())
        if rows.get("serving") == "true":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cache is not serving: {rows}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------- (a) throughput

@dataclass
class PgbenchRun:
    round: int
    scenario: str
    target: str
    tps: float | None
    transactions: int
    failed: int
    hit_ratio: float | None = None
    invalidation_failures: int | None = None   # writes the cache could not record (it stops serving a while)
    bypassed: int | None = None                # cacheable reads sent to Postgres because Redis was slow or down
    proxy_cpu_us_per_tx: float | None = None   # CPU time of the pgpilot process per transaction
    redis_cpu_us_per_tx: float | None = None
    pgbench_cpu_us_per_tx: float | None = None  # the client's own CPU time
    postgres_cpu_us_per_tx: float | None = None  # every process of the cluster (backends, walsenders...)
    machine_cpu_us_per_tx: float | None = None  # every process on the machine (both cores), for the bound
    cache_counters: dict | None = None          # SHOW CACHE counters that moved during the run
    error: str | None = None


class ClusterCpu:
    """CPU seconds of a PostgreSQL cluster's processes (postmaster and children) over a run, sampled every 0.2 s
    so backends that exit before the end still count (all but their last fraction of a sample)."""

    def __init__(self, cluster: PgCluster):
        self.root = psutil.Process(int((cluster.datadir / "postmaster.pid").read_text().split()[0]))
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self._last[p.pid] = t.user + t.system
            self._first.setdefault(p.pid, self._last[p.pid] if self._thread is None else 0.0)

    def __enter__(self) -> "ClusterCpu":
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


def pgbench(host: str, port: int, script_path: Path, protocol: str, clients: int, seconds: int) -> dict:
    command = ["pgbench", "-n", "-M", protocol, "-f", str(script_path), "-c", str(clients), "-j", str(min(2, clients)),
               "-T", str(seconds), "-h", host, "-p", str(port), "-U", "postgres", DBNAME]
    children, machine = resource.getrusage(resource.RUSAGE_CHILDREN), psutil.cpu_times()
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    children_after, machine_after = resource.getrusage(resource.RUSAGE_CHILDREN), psutil.cpu_times()
    client_cpu = children_after.ru_utime + children_after.ru_stime - children.ru_utime - children.ru_stime
    machine_cpu = sum(machine_after) - sum(machine) - (machine_after.idle - machine.idle) - (
        machine_after.iowait - machine.iowait)

    def number(pattern: str, cast=float):
        m = re.search(pattern, out.stdout)
        return cast(m.group(1)) if m else None

    error = None
    if out.returncode != 0:
        error = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
    return {"tps": None if error else number(r"tps = ([\d.]+) \(without initial connection time\)"),
            "transactions": number(r"number of transactions actually processed: (\d+)", int) or 0,
            "failed": number(r"number of failed transactions: (\d+)", int) or 0, "error": error,
            "client_cpu": client_cpu, "machine_cpu": machine_cpu}


def hit_ratio(before: dict, after: dict) -> float | None:
    """Hits over cacheable reads: hits, misses, bypassed lookups and reads not analysed yet (writes excluded)."""
    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)
    hits = delta("hits")
    total = hits + delta("misses") + delta("uncacheable:pending") + sum(
        delta(k) for k in after if k.startswith("bypass:"))
    return hits / total if total else None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def per_tx_us(before: float | None, after: float | None, transactions: int) -> float | None:
    if before is None or after is None or not transactions:
        return None
    return (after - before) / transactions * 1e6


def trouble(before: dict, after: dict) -> tuple[int, int]:
    """(invalidation failures, lookups bypassed because Redis was slow, down or not trusted yet) between two stats."""
    failures = after.get("invalidation_failures", 0) - before.get("invalidation_failures", 0)
    bypassed = sum(after.get(k, 0) - before.get(k, 0) for k in after
                   if k in ("bypass:redis_timeout", "bypass:breaker_open", "bypass:redis_down", "bypass:inconsistent"))
    return int(failures), int(bypassed)


# ------------------------------------------------------------------------------------------- (b) hit latency

def latencies_us(dsn: str, sql: str, runs: int) -> list[float]:
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        out = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            conn.execute(sql).fetchall()
            out.append((time.perf_counter_ns() - t0) / 1000)
        return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ------------------------------------------------------------------------------------------- (c) trace vs oracle

@dataclass
class Policy:
    name: str
    reads: int = 0
    hits: int = 0
    saved_us: float = 0.0

    @property
    def ratio(self) -> float:
        return self.hits / self.reads if self.reads else 0.0


def read_trace(cluster: PgCluster, since: float, until: float) -> list[tuple]:
    """Successful reads and writes logged between two Unix times, in order:
    (fingerprint, kind, tables_read, tables_written, parameters, duration_us, cache_outcome)."""
    with psycopg.connect(cluster.dsn_for(STORE), autocommit=True) as conn:
        return conn.execute(
            "SELECT fingerprint, kind, tables_read, tables_written, parameters, duration_us, cache_outcome "
            "FROM pgpilot.query_events WHERE ts >= to_timestamp(%s) AND ts < to_timestamp(%s) AND sqlstate IS NULL "
            "AND kind IN ('select', 'insert', 'update', 'delete') ORDER BY ts", [since, until]).fetchall()


def wait_logged(cluster: PgCluster, since: float, expected: int, timeout: float = 60) -> None:
    """Until the log store holds `expected` events since `since` (the writer ships them in batches)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(cluster.dsn_for(STORE), autocommit=True) as conn:
        while True:
            n = conn.execute("SELECT count(*) FROM pgpilot.query_events WHERE ts >= to_timestamp(%s)",
                             [since]).fetchone()[0]
            if n >= expected or time.monotonic() > deadline:
                return
            time.sleep(0.5)


def replay(trace: list[tuple]) -> list[Policy]:
    """pgpilot's logged hits, and the two simulated caches over the same sequence (see the module docstring)."""
    db_time: dict[str, list[int]] = {}
    for fp, kind, _, _, _, duration, outcome in trace:
        if kind == "select" and outcome != "hit":
            db_time.setdefault(fp, []).append(duration)
    cost = {fp: statistics.median(v) for fp, v in db_time.items()}
    measured, per_table, oracle = Policy("pgpilot (measured)"), Policy("per-table (simulated)"), Policy("oracle")
    table_cache: dict[tuple, tuple] = {}          # result key -> tables read
    row_cache: dict[tuple, tuple] = {}            # result key -> (tables, rows) the result depends on
    by_table: dict[str, set] = {}
    for fp, kind, tables_read, tables_written, params, _, outcome in trace:
        params = tuple(params or ())
        if kind == "select":
            key = (fp, params)
            saved = cost.get(fp, 0.0)
            for policy, cache in ((per_table, table_cache), (oracle, row_cache)):
                policy.reads += 1
                if key in cache:
                    policy.hits += 1
                    policy.saved_us += saved
                else:
                    cache[key] = True
                    for t in tables_read or ():
                        by_table.setdefault(t, set()).add(key)
            measured.reads += 1
            if outcome == "hit":
                measured.hits += 1
                measured.saved_us += saved
            continue
        for t in tables_written or ():
            for key in by_table.get(t, ()):
                table_cache.pop(key, None)
                if key[1][-1:] == params[-1:]:     # the oracle: only results of the row written
                    row_cache.pop(key, None)
    return [measured, per_table, oracle]


# ------------------------------------------------------------------------------------------- main

@dataclass
class Report:
    settings: dict
    sales_rows: int = 0
    heavy_direct_ms: float = 0.0
    throughput: list[dict] = field(default_factory=list)
    throughput_runs: list[dict] = field(default_factory=list)
    latency: dict = field(default_factory=dict)
    latency_rounds: list[dict] = field(default_factory=list)
    oracle: list[dict] = field(default_factory=list)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 3 s, a ~10 ms heavy query")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10, help="seconds per pgbench run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--protocol", default="prepared", choices=["simple", "extended", "prepared"])
    ap.add_argument("--zipf", type=float, default=1.1, help="random_zipfian parameter")
    ap.add_argument("--read-percent", type=int, default=95)
    ap.add_argument("--heavy-ms", type=float, default=50.0, help="target duration of the heavy query on Postgres")
    ap.add_argument("--hit-runs", type=int, default=2000, help="timed cache hits per round")
    ap.add_argument("--parts", default="abc", help="which parts to run: any of a (throughput), b (hit latency), "
                    "c (logged trace)")
    ap.add_argument("--scenario", choices=list(SCENARIOS), action="append",
                    help="run only this scenario of (a) and (c) (repeatable; default: both)")
    ap.add_argument("--profile", metavar="DIR", help="write cProfiles of both pgpilot targets into DIR")
    ap.add_argument("--json", help="write the runs and the summary here")
    args = ap.parse_args(argv)
    scenarios = {k: v for k, v in SCENARIOS.items() if not args.scenario or k in args.scenario}
    if args.quick:
        args.rounds, args.seconds, args.heavy_ms, args.hit_runs = 1, 3, 10.0, 300
    report = Report(settings=vars(args).copy())
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-bench-cache-"))
    cluster = PgCluster().start()
    redis = RedisServer().start()
    started: list[ProxyProcess] = []
    try:
        log(f"PostgreSQL :{cluster.port}, Redis :{redis.port}; creating {HOT_ROWS} items and the sales table ...")
        report.sales_rows, report.heavy_direct_ms = create_schema(
            cluster, args.heavy_ms, 5_000_000 if "b" in args.parts else 20_000)
        log(f"sales: {report.sales_rows} rows, heavy aggregate {report.heavy_direct_ms:.1f} ms direct")
        profiles = Path(args.profile) if args.profile else None
        if profiles:
            profiles.mkdir(parents=True, exist_ok=True)
        plain = pilot(cluster, args.pool_size, None, profile=str(profiles / "pgpilot.prof") if profiles else None)
        cached = pilot(cluster, args.pool_size, cache_section(redis),
                       profile=str(profiles / "pgpilot+cache.prof") if profiles else None)
        started += [plain, cached]
        wait_serving(cached)
        targets = {"direct": (cluster.host, cluster.port, None), "pgpilot": (plain.host, plain.port, plain.proc.pid),
                   "pgpilot+cache": (cached.host, cached.port, cached.proc.pid)}
        scripts = {}
        for name, update in scenarios.items():
            scripts[name] = tmp / f"{name.replace(' ', '_')}.sql"
            scripts[name].write_text(script(update, args.zipf, args.read_percent))

        # (a) throughput, interleaved per round and scenario
        runs: list[PgbenchRun] = []
        for n in range(1, args.rounds + 1 if "a" in args.parts else 1):
            for scenario in scenarios:
                for target in TARGETS:
                    host, port, pid = targets[target]
                    before = cache_stats(cached) if target == "pgpilot+cache" else None
                    cpu = cpu_seconds(pid), cpu_seconds(redis.proc.pid if before is not None else None)
                    with ClusterCpu(cluster) as pg_cpu:
                        r = pgbench(host, port, scripts[scenario], args.protocol, args.clients, args.seconds)
                    run = PgbenchRun(n, scenario, target, r["tps"], r["transactions"], r["failed"], error=r["error"])
                    run.proxy_cpu_us_per_tx = per_tx_us(cpu[0], cpu_seconds(pid), r["transactions"])
                    run.pgbench_cpu_us_per_tx = per_tx_us(0.0, r["client_cpu"], r["transactions"])
                    run.machine_cpu_us_per_tx = per_tx_us(0.0, r["machine_cpu"], r["transactions"])
                    run.postgres_cpu_us_per_tx = per_tx_us(0.0, pg_cpu.seconds, r["transactions"])
                    if before is not None:
                        run.redis_cpu_us_per_tx = per_tx_us(cpu[1], cpu_seconds(redis.proc.pid), r["transactions"])
                    if before is not None:
                        after = cache_stats(cached)
                        run.hit_ratio = hit_ratio(before, after)
                        run.invalidation_failures, run.bypassed = trouble(before, after)
                        run.cache_counters = {k: after[k] - before.get(k, 0) for k in after
                                              if after[k] != before.get(k, 0)}
                        log("    " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(run.cache_counters.items())))
                    runs.append(run)
                    log(f"[(a) round {n}/{args.rounds}] {scenario:<10} {target:<13} {fmt(run.tps)} tps"
                        + (f", proxy {run.proxy_cpu_us_per_tx:.0f} us CPU/tx" if run.proxy_cpu_us_per_tx else "")
                        + (f", hit ratio {run.hit_ratio:.2f}, {run.invalidation_failures} invalidation failures, "
                           f"{run.bypassed} bypassed" if run.hit_ratio is not None else "")
                        + (f", {run.failed} failed" if run.failed else "") + (f"  ERROR {run.error}" if run.error else ""))
                    for p in started:
                        if not p.alive():
                            raise RuntimeError(f"pgpilot died:\n{p.log()[-3000:]}")
        report.throughput_runs = [asdict(r) for r in runs]
        for scenario in scenarios if runs else ():
            mine = [r for r in runs if r.scenario == scenario]

            def per_round(a: str, b: str) -> float | None:
                values = []
                for n in range(1, args.rounds + 1):
                    one = {r.target: r for r in mine if r.round == n}
                    if one.get(a) and one.get(b) and one[a].tps and one[b].tps:
                        values.append(one[a].tps / one[b].tps)
                return median(values)

            report.throughput.append({
                "scenario": scenario, **{f"tps_{t}": median([r.tps for r in mine if r.target == t]) for t in TARGETS},
                "cache_vs_direct": per_round("pgpilot+cache", "direct"),
                "cache_vs_pgpilot": per_round("pgpilot+cache", "pgpilot"),
                "pgpilot_vs_direct": per_round("pgpilot", "direct"),
                "hit_ratio": median([r.hit_ratio for r in mine if r.target == "pgpilot+cache"]),
                "proxy_cpu_us_per_tx_pgpilot": median([r.proxy_cpu_us_per_tx for r in mine if r.target == "pgpilot"]),
                "proxy_cpu_us_per_tx_cache": median([r.proxy_cpu_us_per_tx for r in mine if r.target == "pgpilot+cache"]),
                "redis_cpu_us_per_tx": median([r.redis_cpu_us_per_tx for r in mine if r.target == "pgpilot+cache"]),
                **{f"pgbench_cpu_us_per_tx_{t}": median([r.pgbench_cpu_us_per_tx for r in mine if r.target == t])
                   for t in TARGETS},
                **{f"postgres_cpu_us_per_tx_{t}": median([r.postgres_cpu_us_per_tx for r in mine if r.target == t])
                   for t in TARGETS},
                **{f"machine_cpu_us_per_tx_{t}": median([r.machine_cpu_us_per_tx for r in mine if r.target == t])
                   for t in TARGETS},
                "invalidation_failures": sum(r.invalidation_failures or 0 for r in mine),
                "bypassed": sum(r.bypassed or 0 for r in mine),
                "failed": sum(r.failed for r in mine), "errors": [r.error for r in mine if r.error]})

        # (b) hit latency of the heavy aggregate
        floor_sql = "SELECT 1"
        for n in range(1, args.rounds + 1 if "b" in args.parts else 1):
            direct = latencies_us(cluster.dsn_for(DBNAME), HEAVY, 20)
            through = latencies_us(plain.dsn(DBNAME), HEAVY, 20)
            with psycopg.connect(cached.dsn(DBNAME), autocommit=True, prepare_threshold=None) as conn:
                for _ in range(50):                      # analysed, filled, admitted
                    before = cache_stats(cached)["hits"]
                    conn.execute(HEAVY).fetchall()
                    if cache_stats(cached)["hits"] > before:
                        break
                    time.sleep(0.1)
            before = cache_stats(cached)["hits"]
            hits = latencies_us(cached.dsn(DBNAME), HEAVY, args.hit_runs)
            served = cache_stats(cached)["hits"] - before
            floor = latencies_us(cluster.dsn_for(DBNAME), floor_sql, 200)
            one = {"round": n, "direct_p50_us": pct(direct, 0.5), "pgpilot_p50_us": pct(through, 0.5),
                   "hit_p50_us": pct(hits, 0.5), "hit_p90_us": pct(hits, 0.9), "hit_p99_us": pct(hits, 0.99),
                   "hits_counted": served, "hit_runs": len(hits), "floor_select1_p50_us": pct(floor, 0.5)}
            report.latency_rounds.append(one)
            log(f"[(b) round {n}/{args.rounds}] heavy: direct p50 {one['direct_p50_us'] / 1000:.1f} ms, pgpilot "
                f"{one['pgpilot_p50_us'] / 1000:.1f} ms, hit p50 {one['hit_p50_us']:.0f} us p99 {one['hit_p99_us']:.0f} us "
                f"({served:.0f}/{len(hits)} counted as hits); SELECT 1 direct p50 {one['floor_select1_p50_us']:.0f} us")
        if report.latency_rounds:
            report.latency = {k: median([r[k] for r in report.latency_rounds]) for k in report.latency_rounds[0]
                              if k != "round"}

        # (c) a logged trace against the simulated caches
        plain.stop()
        if "c" in args.parts:
            logged = pilot(cluster, args.pool_size, cache_section(redis),
                           {"enabled": True, "parameters": True, "flush_interval": 0.2, "dsn": cluster.dsn_for(STORE)})
            started.append(logged)
            wait_serving(logged)
        for scenario in scenarios if "c" in args.parts else ():
            since = time.time()
            r = pgbench(logged.host, logged.port, scripts[scenario], "simple", args.clients, args.seconds)
            until = time.time()
            wait_logged(cluster, since, r["transactions"])
            trace = read_trace(cluster, since, until)
            for p in replay(trace):
                report.oracle.append({"scenario": scenario, "policy": p.name, "reads": p.reads, "hits": p.hits,
                                      "hit_ratio": p.ratio, "db_time_saved_s": p.saved_us / 1e6})
            log(f"[(c)] {scenario}: {r['transactions']} transactions, {len(trace)} events in the trace")

        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(report), indent=2))
            print(f"wrote {args.json}")
        return 1 if any(t["errors"] or t["failed"] for t in report.throughput) else 0
    finally:
        for p in started:
            p.stop()
        redis.destroy()
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def print_report(report: Report) -> None:
    if report.throughput:
        print_throughput(report)
    if report.latency:
        print_latency(report)
    if report.oracle:
        print_oracle(report)


def print_throughput(report: Report) -> None:
    s = report.settings
    print(f"\n(a) read-mostly pgbench -M {s['protocol']} -c {s['clients']}, {s['read_percent']}% reads of "
          f"{HOT_ROWS} rows (random_zipfian {s['zipf']}), {s['rounds']} round(s) of {s['seconds']} s")
    header = (f"{'updates go to':<13} | {'direct':>8} {'pgpilot':>8} {'+cache':>8} | {'cache/direct':>12} "
              f"{'cache/pgpilot':>13} {'pgpilot/direct':>14} | {'hit ratio':>9} | {'inv fail':>8} {'bypassed':>8} | "
              f"{'CPU us/tx pgpilot':>17} {'+cache':>7} {'redis':>6}")
    print(header)
    print("-" * len(header))
    for t in report.throughput:
        print(f"{t['scenario']:<13} | {fmt(t['tps_direct']):>8} {fmt(t['tps_pgpilot']):>8} "
              f"{fmt(t['tps_pgpilot+cache']):>8} | {fmt(t['cache_vs_direct'], '.2f'):>12} "
              f"{fmt(t['cache_vs_pgpilot'], '.2f'):>13} {fmt(t['pgpilot_vs_direct'], '.2f'):>14} | "
              f"{fmt(t['hit_ratio'], '.2f'):>9} | {t['invalidation_failures']:>8} {t['bypassed']:>8} | "
              f"{fmt(t['proxy_cpu_us_per_tx_pgpilot']):>17} {fmt(t['proxy_cpu_us_per_tx_cache']):>7} "
              f"{fmt(t['redis_cpu_us_per_tx']):>6}")
    print("ratios: median of per-round ratios; hit ratio: hits / cacheable reads during the cache's runs; "
          "inv fail: writes the cache could not record in Redis (it stops serving until consistent again); "
          "bypassed: reads sent to Postgres because Redis was slow, down or not trusted yet (all rounds); "
          "CPU us/tx: process CPU time per pgbench transaction (median over rounds)")
    print(f"\nCPU us/tx      | {'pgbench: direct':>15} {'pgpilot':>7} {'+cache':>7} | {'Postgres: direct':>16} "
          f"{'pgpilot':>7} {'+cache':>7} | {'machine: direct':>15} {'pgpilot':>7} {'+cache':>7}")
    for t in report.throughput:
        print(f"{t['scenario']:<14} | " + " ".join(fmt(t[f"pgbench_cpu_us_per_tx_{x}"]).rjust(w) for x, w in
                                                   zip(TARGETS, (15, 7, 7)))
              + " | " + " ".join(fmt(t[f"postgres_cpu_us_per_tx_{x}"]).rjust(w) for x, w in zip(TARGETS, (16, 7, 7)))
              + " | " + " ".join(fmt(t[f"machine_cpu_us_per_tx_{x}"]).rjust(w) for x, w in zip(TARGETS, (15, 7, 7))))
    print("pgbench: the client's CPU; Postgres: every process of the cluster (backends, the cache's decoding "
          "walsender...); machine: both cores busy, every process (other users of the machine included)")


def print_latency(report: Report) -> None:
    lat = report.latency
    print(f"\n(b) heavy aggregate over {report.sales_rows} rows (sized when its calibration run took "
          f"{report.heavy_direct_ms:.1f} ms), one client, median over rounds")
    print(f"direct p50 {lat['direct_p50_us'] / 1000:.2f} ms | pgpilot p50 {lat['pgpilot_p50_us'] / 1000:.2f} ms | "
          f"cache hit p50 {lat['hit_p50_us']:.0f} us, p90 {lat['hit_p90_us']:.0f} us, p99 {lat['hit_p99_us']:.0f} us "
          f"({lat['hits_counted']:.0f} of {lat['hit_runs']:.0f} runs counted as hits) | "
          f"client floor (SELECT 1 direct) p50 {lat['floor_select1_p50_us']:.0f} us")


def print_oracle(report: Report) -> None:
    s = report.settings
    print(f"\n(c) logged trace (-M simple, {s['seconds']} s per scenario), unbounded caches admitting everything")
    header = f"{'updates go to':<13} | {'policy':<22} | {'reads':>7} {'hits':>7} {'hit ratio':>9} | {'DB time saved s':>15}"
    print(header)
    print("-" * len(header))
    for o in report.oracle:
        print(f"{o['scenario']:<13} | {o['policy']:<22} | {o['reads']:>7} {o['hits']:>7} {o['hit_ratio']:>9.3f} | "
              f"{o['db_time_saved_s']:>15.2f}")


if __name__ == "__main__":
    sys.exit(main())
