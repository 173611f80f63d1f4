"""What the learner's models cost inside the proxy: pgbench -S through pgpilot with anomaly scoring and learned cache
admission on, against the same proxy with both off, side by side.

    python -m bench.models_overhead [--rounds 3] [--duration 10] [--clients 16] [--protocols simple,extended,prepared]
                                    [--no-cache] [--query-log] [--warmup 2] [--keep-proxies] [--no-pin] [--same]
                                    [--json out.json] [--quick] [--in-process]

One private PostgreSQL cluster (fsync off) gets `pgbench -i -s <scale>`. Its traffic (pgbench -S and -N with the
benchmark's client count through a logging proxy for a few seconds) is the log the learner's anomaly step trains on
(learning.pipeline, exported to ONNX and promoted in a registry). The cache model is a stand-in that declines the
pgbench read, as the learner's cache simulator decides for random keys that are never read twice before eviction
(its own cache step skips a log whose labels are all "does not pay").

Two proxies run in front of the cluster, identical (transaction pooling, query log off unless --query-log,
result cache on unless --no-cache) except that `off` has anomaly scoring and model loading disabled, and `on`
serves the registry: every statement scored by the anomaly model, fills admitted by the cache model. For each
round and protocol, `pgbench -S -M <protocol> -c <clients> -T <duration>` runs against both, interleaved (which
goes first alternates by round), each measured run right after `--warmup` seconds of the same traffic on the same
proxy. Each round starts two new proxy processes (`--keep-proxies`: the same two throughout), so that a
process's own luck (hash seed, memory layout) is a round's noise, not a bias of the whole run. On a machine with
two CPUs or more the proxies run on the last CPU and Postgres, pgbench and this process on the others (`--no-pin`:
the scheduler places everything), for training too. The table shows per protocol the median TPS of each, the
median of the per-round ratios on/off with its 90 % bootstrap interval, the proxy process CPU per transaction
(psutil), the scorer's own CPU per scored statement (from pgpilot_anomaly_scoring_cpu_seconds /
pgpilot_anomaly_scored), the mean batch size, and the share of statements scored (and, when flagged, flagged)
within 100 ms of completion. `--same` runs both with models off: an A/A run, the benchmark's own noise.

`--in-process` runs no proxy: after training, it times the statement feed's work per statement in this process
(thread CPU time of the analysis and of AnomalyScorer.score_records on batches of pgbench -S records whose
durations, rows and bytes are drawn from the logged training traffic, a simple-protocol text with a new aid each
time or one extended text), after a warm-up, and prints the minimum and median over batches. It is what the
scorer costs without the noise of pgbench and Postgres sharing the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.pinning import Pinning
from tests.ops.helpers import metric_samples
from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.services import PgCluster

DBNAME = "bench"
TARGETS = ("off", "on")
PGBENCH_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


@dataclass
class Run:
    round: int
    protocol: str
    target: str
    tps: float | None
    transactions: int
    failed: int
    cpu_us_per_tx: float | None
    scored: int = 0
    scoring_us_per_statement: float | None = None
    mean_batch: float | None = None
    scored_within_100ms: float | None = None
    delay_p99_ms: float | None = None
    flags: int = 0
    inline_share: float | None = None
    error: str | None = None


@dataclass
class Summary:
    protocol: str = ""
    tps: dict = field(default_factory=dict)
    cpu_us_per_tx: dict = field(default_factory=dict)
    ratio_on_off: float | None = None
    ratio_ci90: tuple | None = None      # bootstrap 90 % interval of that median, over the rounds
    ratio_of_totals: float | None = None  # transactions on / off over all rounds (equal durations)
    scoring_us_per_statement: float | None = None
    mean_batch: float | None = None
    scored_within_100ms: float | None = None
    delay_p99_ms: float | None = None
    failed: int = 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pgbench(host: str, port: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["pgbench", "-h", host, "-p", str(port), "-U", "postgres", *args, DBNAME],
                          capture_output=True, text=True, timeout=timeout)


def train_models(cluster: PgCluster, model_dir: Path, seconds: int, clients: int, pinning: Pinning) -> dict:
    """The learner's anomaly model from logged pgbench traffic at the benchmark's own client count (the normal
    latencies of a saturated machine are what it must learn: trained on lighter traffic it flags the load itself),
    and the stand-in cache model; returns their shas."""
    import psycopg

    from learning.export import export_onnx
    from learning.logdata import load_log, time_split
    from learning.pipeline import LearnSettings, train_anomaly_model
    from learning.registry import Registry
    from proxy.analysis import analyze
    from proxy.config import LearningConfig
    from proxy.features import ServingContext, TemplateStats, transform_many
    dsn = cluster.dsn_for(DBNAME)
    with pinning.for_proxy():    # the normal it learns is the latencies of the setup the runs measure
        recorder = ProxyProcess({"databases": {DBNAME: upstream_entry(cluster, DBNAME)},
                                 "query_log": {"enabled": True, "flush_interval": 0.2},
                                 "anomaly": {"enabled": False}, "models": {"enabled": False}}).start()
    try:
        for script in ("-S", "-N"):
            pgbench(recorder.host, recorder.port, "-n", script, "-c", str(clients), "-j", "2", "-T", str(seconds))
    finally:
        recorder.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        event_log = load_log(conn)
    log(f"training the anomaly model on {len(event_log):,} logged statements")
    train, test = time_split(event_log, 0.2)
    registry = Registry(model_dir)
    anomaly = train_anomaly_model(LearnSettings(dsn, str(model_dir), LearningConfig(model_dir=str(model_dir))),
                                  registry, event_log, train, test, {}, labels={})
    log(f"anomaly model {anomaly['registry']['sha256'][:12]}: {anomaly['headline']}")
    from sklearn.tree import DecisionTreeClassifier
    select = analyze(PGBENCH_SELECT)
    stats = {select.fingerprint: TemplateStats(calls=100_000, calls_per_hour=1e6, p50_us=60, mean_us=70,
                                               rows_p50=1, bytes_p50=40, write_rate=3e5, key_ratio=1.0)}
    X = transform_many([{"sql": select.normalized, "template": stats[select.fingerprint]},
                        {"sql": "SELECT count(*) FROM pgbench_branches", "template": None}], "cache")
    model = DecisionTreeClassifier(random_state=0).fit(X, [0, 1])
    sha = registry.add(export_onnx(model, "cache", algorithm="stand-in", metrics={}, training_window={},
                                   extra={"admit_at": 0.5}), {"kind": "cache"}, ServingContext(stats).to_json())
    registry.promote("cache", sha, metric="db_time_saved_s", score=0.0, champion_score=None, higher_is_better=True)
    return {"anomaly": anomaly["registry"]["sha256"], "cache": sha}


def in_process(cluster: PgCluster, model_dir: Path, batch: int = 370, batches: int = 300, warm: int = 100) -> None:
    """Per statement CPU of the feed's analysis and the scorer's score_records, in this process (see --in-process)."""
    import logging
    import random

    import psycopg

    from proxy.analysis import Analyzer
    from proxy.config import AnomalyConfig
    from proxy.models import load_champion
    from proxy.querylog import StatementFeed, session_info
    from proxy.scoring import AnomalyScorer
    logging.getLogger("pgpilot.anomaly").setLevel(logging.ERROR)     # the flags' log lines are not measured here
    with psycopg.connect(cluster.dsn_for(DBNAME), autocommit=True) as conn:
        facts = conn.execute("SELECT duration_us, coalesce(rows, 0), bytes_out FROM pgpilot.query_events "
                             "WHERE kind = 'select'").fetchall()
        sender = conn.execute("SELECT database, username, application_name, host(client_addr) FROM "
                              "pgpilot.query_events GROUP BY 1, 2, 3, 4 ORDER BY count(*) DESC LIMIT 1").fetchone()
    model = load_champion(model_dir, "anomaly")
    who = session_info(*sender)
    rnd = random.Random(0)
    extended = PGBENCH_SELECT.encode()
    print(f"\nin-process, batches of {batch} pgbench -S records (durations, rows, bytes of {len(facts):,} logged "
          f"selects), thread CPU us per statement, min / median over {batches} batches")
    for protocol in ("simple", "extended"):
        analyzer = Analyzer()
        scorer = AnomalyScorer(AnomalyConfig(), analyzer)
        scorer.use_model(model)
        feed = StatementFeed(analyzer, 0.04)
        ts = time.time()
        analyse_us, score_us = [], []
        for n in range(warm + batches):
            records = []
            for _ in range(batch):
                dur, rows, nbytes = facts[rnd.randrange(len(facts))]
                sql, idx = ((b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % rnd.randint(1, 1_000_000), 0)
                            if protocol == "simple" else (bytes(extended), -1))
                ts += 1e-4
                records.append((ts, dur, 0, sql, rows, nbytes, None, who, 1, None, False, idx, None, None, None, None))
            c0 = time.thread_time_ns()
            infos = feed.analyse(records)
            c1 = time.thread_time_ns()
            scorer.score_records(records, infos)
            c2 = time.thread_time_ns()
            if n >= warm:
                analyse_us.append((c1 - c0) / batch / 1000)
                score_us.append((c2 - c1) / batch / 1000)
        print(f"{protocol:<9} analysis {min(analyse_us):.3f} / {statistics.median(analyse_us):.3f}, score_records "
              f"{min(score_us):.3f} / {statistics.median(score_us):.3f}; memo {len(scorer._memo):,} keys, "
              f"{sum(scorer.flags.values())} flags")


def statement_path(cluster: PgCluster, model_dir: Path, statements: int = 60_000, warm: int = 60_000,
                   batch: int = 600, repeats: int = 5) -> None:
    """Per statement CPU of a session finishing it (ClientSession._statement_done) plus its share of the feed's
    ticks, in this process: without scoring, scored from records, and with the inline lane (see --in-process)."""
    import logging
    import random

    import psycopg

    from proxy import protocol as P
    from proxy.analysis import Analyzer
    from proxy.config import AnomalyConfig
    from proxy.models import load_champion
    from proxy.querylog import StatementFeed, session_info
    from proxy.scoring import AnomalyScorer
    from proxy.session import ClientSession, Pending
    from proxy.stats import TrafficStats
    logging.getLogger("pgpilot.anomaly").setLevel(logging.ERROR)
    with psycopg.connect(cluster.dsn_for(DBNAME), autocommit=True) as conn:
        facts = conn.execute("SELECT duration_us, bytes_out FROM pgpilot.query_events WHERE kind = 'select'").fetchall()
        sender = conn.execute("SELECT database, username, application_name, host(client_addr) FROM "
                              "pgpilot.query_events GROUP BY 1, 2, 3, 4 ORDER BY count(*) DESC LIMIT 1").fetchone()
    model = load_champion(model_dir, "anomaly")
    who = session_info(*sender)
    extended = PGBENCH_SELECT.encode()
    cc = P.command_complete("SELECT 1")

    class Backend:
        pid = 4242

    def run(variant: str, protocol: str, seed: int) -> tuple[float, float]:
        rnd = random.Random(seed)
        analyzer = Analyzer()
        scorer = AnomalyScorer(AnomalyConfig(), analyzer)
        scorer.use_model(model)
        feed = scorer.feed = StatementFeed(analyzer, 0.04)
        feed.scorer = scorer
        scorer.inline = variant == "lane"
        session = object.__new__(ClientSession)
        session.traffic = TrafficStats(who.database, who.username)
        session._record = feed.records.append if variant != "off" else None
        session._lane = scorer if variant == "lane" else None
        session._log_session = who
        who.lane_q.clear()       # lanes another run's scorer opened
        who.lane_x.clear()
        session.bytes_out = session._bytes_mark = session._wait_us = 0
        session.backend, session.xact_id, session.txn_status = Backend(), 0, b"I"
        kind = P.F_QUERY if protocol == "simple" else P.F_EXECUTE
        prepared = bytes(extended)
        drawn = [facts[rnd.randrange(len(facts))] for _ in range(4096)]
        elapsed = 0.0
        done = 0
        for n in range(warm + statements):
            dur, nbytes = drawn[n & 4095]
            sql = (b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % rnd.randint(1, 1_000_000)
                   if protocol == "simple" else prepared if protocol == "prepared" else bytes(extended))
            e = Pending(kind, sql=sql)
            c0 = time.thread_time()
            e.start = time.perf_counter() - dur * 1e-6
            session.bytes_out += nbytes
            session._statement_done(e, cc, None, [])
            if (n + 1) % batch == 0:
                feed.tick()
            c1 = time.thread_time()
            if n >= warm:
                elapsed += c1 - c0
                done += 1
            elif n == warm - 1:
                feed.tick()
                scorer.settle()
                inline0, scored0 = scorer.scored_inline, sum(scorer.scored.values())
        feed.tick()
        scorer.settle()
        scored = sum(scorer.scored.values()) - scored0
        return elapsed / done * 1e6, (scorer.scored_inline - inline0) / scored if scored else 0.0

    print(f"\nin-process, a session finishing pgbench -S statements (durations and bytes of {len(facts):,} logged "
          f"selects) and the feed ticking every {batch}: thread CPU us per statement, min over {repeats} runs of "
          f"{statements:,} after {warm:,}")
    for protocol in ("simple", "extended", "prepared"):
        best: dict[str, float] = {}
        share = 0.0
        for r in range(repeats):
            for variant in ("off", "records", "lane"):
                us, inline = run(variant, protocol, r)
                best[variant] = min(best.get(variant, math.inf), us)
                if variant == "lane":
                    share = inline
        print(f"{protocol:<9} no scoring {best['off']:.2f}, records +{best['records'] - best['off']:.2f}, "
              f"inline lane +{best['lane'] - best['off']:.2f} ({100 * share:.1f}% of the timed statements inline)")


def scorer_counters(proxy: ProxyProcess) -> dict:
    s = metric_samples(proxy)
    delays = sorted((float(dict(labels)["le"]), v) for (name, labels), v in s.items()
                    if name == "pgpilot_anomaly_scoring_delay_seconds_bucket")
    return {"scored": s.get(("pgpilot_anomaly_scored_total", (("source", "model"),)), 0.0),
            "inline": s.get(("pgpilot_anomaly_scored_inline_total", ()), 0.0),
            "busy": s.get(("pgpilot_anomaly_scoring_cpu_seconds_total", ()), 0.0),
            "batches": s.get(("pgpilot_anomaly_batch_size_count", ()), 0.0),
            "batch_sum": s.get(("pgpilot_anomaly_batch_size_sum", ()), 0.0),
            "flags": sum(v for (name, _), v in s.items() if name == "pgpilot_anomaly_flags_total"),
            "delays": delays}


def delay_stats(before: dict, after: dict) -> tuple[float | None, float | None]:
    """(share within 100 ms, p99 in ms by bucket upper bound) of the statements scored between two scrapes."""
    diff = [(le, a - b) for (le, a), (_, b) in zip(after["delays"], before["delays"])] if before["delays"] else \
        after["delays"]
    total = diff[-1][1] if diff else 0
    if not total:
        return None, None
    within = next((n for le, n in diff if le >= 0.1), total) / total
    p99 = next((le for le, n in diff if n >= 0.99 * total), math.inf)
    return within, p99 * 1000


def run_once(n: int, target: str, proxy: ProxyProcess, clients: int, duration: int, protocol: str,
             warmup: int = 0) -> Run:
    def select(seconds: int) -> subprocess.CompletedProcess:
        return pgbench(proxy.host, proxy.port, "-n", "-S", "-M", protocol, "-c", str(clients), "-j", "2",
                       "-T", str(seconds))

    if warmup:   # the same traffic first, not counted: both proxies start each measured run from the same state
        select(warmup)
    proc = psutil.Process(proxy.proc.pid)
    before_cpu = sum(proc.cpu_times()[:2])
    before = scorer_counters(proxy) if target == "on" else None
    out = select(duration)
    cpu = sum(proc.cpu_times()[:2]) - before_cpu
    text = out.stdout
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
    tx = int(re.search(r"actually processed: (\d+)", text).group(1)) if "actually processed" in text else 0
    failed = re.search(r"number of failed transactions: (\d+)", text)
    run = Run(n, protocol, target, float(m.group(1)) if m and out.returncode == 0 else None, tx,
              int(failed.group(1)) if failed else 0, cpu / tx * 1e6 if tx else None,
              error=None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1])
    if target == "on":
        time.sleep(0.2)   # the last batch of the run is scored
        after = scorer_counters(proxy)
        scored = after["scored"] - before["scored"]
        run.scored = int(scored)
        run.inline_share = (after["inline"] - before["inline"]) / scored if scored else None
        run.scoring_us_per_statement = (after["busy"] - before["busy"]) / scored * 1e6 if scored else None
        batches = after["batches"] - before["batches"]
        run.mean_batch = (after["batch_sum"] - before["batch_sum"]) / batches if batches else None
        run.scored_within_100ms, run.delay_p99_ms = delay_stats(before, after)
        run.flags = int(after["flags"] - before["flags"])
    return run


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bootstrap_median_ci(values: list[float], level: float = 0.90, resamples: int = 4000) -> tuple | None:
    """Percentile bootstrap interval of the median: how far the rounds' noise leaves the median uncertain."""
    if len(values) < 3:
        return None
    rnd = random.Random(0)
    meds = sorted(statistics.median(rnd.choices(values, k=len(values))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


def summarize(runs: list[Run], protocol: str) -> Summary:
    runs = [r for r in runs if r.protocol == protocol]
    s = Summary(protocol)
    for t in TARGETS:
        s.tps[t] = median(r.tps for r in runs if r.target == t)
        s.cpu_us_per_tx[t] = median(r.cpu_us_per_tx for r in runs if r.target == t)
    ratios = []
    for n in sorted({r.round for r in runs}):
        one = {r.target: r for r in runs if r.round == n}
        if all(one.get(t) and one[t].tps for t in TARGETS):
            ratios.append(one["on"].tps / one["off"].tps)
    s.ratio_on_off = median(ratios)
    s.ratio_ci90 = bootstrap_median_ci(ratios)
    tx = {t: sum(r.transactions for r in runs if r.target == t and r.tps) for t in TARGETS}
    s.ratio_of_totals = tx["on"] / tx["off"] if tx["off"] else None
    on = [r for r in runs if r.target == "on"]
    s.scoring_us_per_statement = median(r.scoring_us_per_statement for r in on)
    s.mean_batch = median(r.mean_batch for r in on)
    s.scored_within_100ms = median(r.scored_within_100ms for r in on)
    s.delay_p99_ms = max((r.delay_p99_ms for r in on if r.delay_p99_ms is not None), default=None)
    s.failed = sum(r.failed for r in runs)
    return s


def fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(runs: list[Run], s: Summary, clients: int, protocol: str, cache: bool, query_log: bool) -> None:
    runs = [r for r in runs if r.protocol == protocol]
    print(f"\npgbench -S -M {protocol} -c {clients}, result cache {'on' if cache else 'off'}, query log "
          f"{'on' if query_log else 'off'} in both")
    print(f"{'round':>5} {'target':<6} {'TPS':>8} {'cpu us/tx':>9} {'scoring us/stmt':>15} {'batch':>6} "
          f"{'<=100ms':>7} {'flags':>6}")
    for r in runs:
        print(f"{r.round:>5} {r.target:<6} {fmt(r.tps):>8} {fmt(r.cpu_us_per_tx, '.1f'):>9} "
              f"{fmt(r.scoring_us_per_statement, '.2f'):>15} {fmt(r.mean_batch, '.1f'):>6} "
              f"{fmt(None if r.scored_within_100ms is None else 100 * r.scored_within_100ms, '.2f'):>7} "
              f"{r.flags if r.target == 'on' else '':>6}" + (f"  {r.error}" if r.error else ""))
    ci = s.ratio_ci90
    print(f"\nmedian TPS off {fmt(s.tps['off'])}, on {fmt(s.tps['on'])}; on/off (median of per-round ratios) "
          f"{fmt(s.ratio_on_off, '.3f')}" + (f", 90% bootstrap interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else "")
          + f"; all transactions on/off {fmt(s.ratio_of_totals, '.3f')}")
    print(f"proxy CPU per transaction: off {fmt(s.cpu_us_per_tx['off'], '.1f')} us, on "
          f"{fmt(s.cpu_us_per_tx['on'], '.1f')} us; scorer CPU per statement {fmt(s.scoring_us_per_statement, '.2f')} "
          f"us (mean batch {fmt(s.mean_batch, '.1f')})")
    print(f"statements scored within 100 ms of completion: "
          f"{fmt(None if s.scored_within_100ms is None else 100 * s.scored_within_100ms, '.3f')}% "
          f"(p99 <= {fmt(s.delay_p99_ms, '.1f')} ms); failed transactions: {s.failed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (pgbench -T: whole seconds)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--protocols", default="simple,extended,prepared",
                        help="comma-separated pgbench -M protocols, each run every round")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--train-seconds", type=int, default=5, help="seconds of pgbench traffic logged for training")
    parser.add_argument("--no-cache", action="store_true", help="result cache off in both (no admission at all)")
    parser.add_argument("--query-log", action="store_true", help="query log on in both (the product's default)")
    parser.add_argument("--same", action="store_true",
                        help="models off in both proxies (an A/A run: the benchmark's own noise, for comparison)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of the same pgbench run on a proxy right before each measured run, not counted")
    parser.add_argument("--keep-proxies", action="store_true",
                        help="the same two proxy processes for every round (default: new ones each round)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the scheduler place the proxies (default: on a CPU of their own, the rest elsewhere)")
    parser.add_argument("--json", help="write every run and the summary here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--in-process", action="store_true",
                        help="no proxies: time the feed's analysis and the scorer per statement in this process")
    args = parser.parse_args(argv)
    if args.same and args.in_process:
        parser.error("--same compares two proxies; --in-process runs none")
    if args.quick:
        args.rounds, args.duration, args.scale, args.clients, args.train_seconds, args.warmup = 1, 2, 1, 4, 2, 1
    duration = args.duration
    pinning = Pinning(not args.no_pin)      # before the cluster starts: its processes inherit the CPUs
    log(pinning.describe())
    cluster = PgCluster().start()
    proxies: dict[str, ProxyProcess] = {}
    model_dir = Path(tempfile.mkdtemp(prefix="pgpilot-bench-models-"))
    try:
        cluster.psql(f"CREATE DATABASE {DBNAME}")
        log(f"pgbench -i -s {args.scale}")
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", cluster.host, "-p", str(cluster.port),
                        "-U", "postgres", DBNAME], check=True, capture_output=True)
        if args.same:
            log("--same: models off in both proxies; 'on' is only the other one's name")
            shas = {}
        else:
            shas = train_models(cluster, model_dir, args.train_seconds, args.clients, pinning)
        if args.in_process:
            in_process(cluster, model_dir)
            statement_path(cluster, model_dir)
            return 0
        common = {"databases": {DBNAME: upstream_entry(cluster, DBNAME)}, "pool_size": args.pool_size,
                  "log_connections": False, "learning": {"model_dir": str(model_dir)},
                  "cache": {"enabled": not args.no_cache}, "query_log": {"enabled": args.query_log}}
        models_off = {**common, "anomaly": {"enabled": False}, "models": {"enabled": False}}
        configs = {"off": models_off, "on": models_off if args.same else common}
        protocols = [p for p in args.protocols.split(",") if p]
        runs: list[Run] = []
        for n in range(1, args.rounds + 1):
            order = TARGETS if n % 2 else TARGETS[::-1]      # which goes first alternates by round
            if not (args.keep_proxies and proxies):
                # New processes each round: a process's own luck (its hash seed, its memory layout) then varies
                # from round to round instead of favouring one proxy in every round of a run.
                for p in proxies.values():
                    p.stop()
                with pinning.for_proxy():
                    proxies.update((target, ProxyProcess(configs[target]).start()) for target in order)
            for protocol in protocols:
                for target in order:
                    run = run_once(n, target, proxies[target], args.clients, duration, protocol, args.warmup)
                    runs.append(run)
                    log(f"round {n}/{args.rounds} -M {protocol} {target}: {fmt(run.tps)} TPS, "
                        f"{fmt(run.cpu_us_per_tx, '.1f')} us cpu/tx"
                        + (f", scorer {fmt(run.scoring_us_per_statement, '.2f')} us/statement" if target == "on"
                           else ""))
        summaries = [summarize(runs, p) for p in protocols]
        for summary in summaries:
            print_table(runs, summary, args.clients, summary.protocol, not args.no_cache, args.query_log)
        print(f"\n{pinning.describe()}; {'new proxies each round' if not args.keep_proxies else 'the same proxies'}, "
              f"{args.warmup} s warm-up before each {duration} s run")
        print(f"{'protocol':<9} | {'TPS off':>8} {'on':>8} | {'on/off':>6} {'90% interval':>12} {'all tx':>6} | "
              f"{'cpu us/tx off':>13} {'on':>6} | {'scorer us/stmt':>14}")
        for s in summaries:
            ci = f"{s.ratio_ci90[0]:.3f}-{s.ratio_ci90[1]:.3f}" if s.ratio_ci90 else "-"
            print(f"{s.protocol:<9} | {fmt(s.tps['off']):>8} {fmt(s.tps['on']):>8} | {fmt(s.ratio_on_off, '.3f'):>6} "
                  f"{ci:>12} {fmt(s.ratio_of_totals, '.3f'):>6} | "
                  f"{fmt(s.cpu_us_per_tx['off'], '.1f'):>13} {fmt(s.cpu_us_per_tx['on'], '.1f'):>6} | "
                  f"{fmt(s.scoring_us_per_statement, '.2f'):>14}")
        if args.json:
            Path(args.json).write_text(json.dumps({"config": vars(args), "models": shas, "runs": [asdict(r) for r in runs],
                                                   "summaries": [asdict(s) for s in summaries]}, indent=2))
        return 0
    finally:
        for p in proxies.values():
            p.stop()
        cluster.destroy()
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
