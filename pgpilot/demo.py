"""`pgpilot demo`: the whole loop on embedded defaults, for a newcomer's first five minutes.

Starts a throwaway PostgreSQL (and Redis when `redis-server` is installed), puts pgpilot in front of it with
query logging and the result cache on, drives a pgbench workload with a few analytical queries mixed in
through the proxy, runs the learner and the index advisor over what was logged, and prints what happened.
Everything it starts is stopped and removed at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pgpilot.throwaway import PgCluster, RedisServer, free_port, wait_for_port

ANALYTICS_SCRIPT = """\\set bid random(1, :scale)
SELECT bid, count(*), sum(abalance) FROM pgbench_accounts WHERE bid = :bid GROUP BY bid;
"""
REPORT_SCRIPT = """SELECT b.bid, sum(a.abalance) FROM pgbench_branches b JOIN pgbench_accounts a USING (bid) GROUP BY b.bid ORDER BY 2 DESC LIMIT 5;
"""


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run(cmd: list[str], timeout: float = 600, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                          env={**os.environ, **(env or {})})


def pgbench(port: int, args: list[str], bindir: Path) -> str:
    out = run([str(bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *args, "postgres"])
    if out.returncode != 0:
        return f"pgbench failed: {out.stderr.strip()[-400:]}"
    tps = re.search(r"tps = ([\d.]+)", out.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return (f"{float(tps.group(1)):,.0f} TPS, {lat.group(1) if lat else '?'} ms average latency, "
            f"{failed.group(1) if failed else '0'} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgpilot demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="workload duration in total (default 30)")
    args = parser.parse_args(argv)
    per_phase = max(3, int(args.seconds / 3))
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-demo-"))
    pg = redis = proxy = None
    python = sys.executable
    try:
        step("starting a throwaway PostgreSQL 15 (initdb in a temp dir, pg_stat_statements, wal_level=logical)")
        pg = PgCluster().start()
        pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        print(f"    PostgreSQL on 127.0.0.1:{pg.port}")
        cache: dict = {"enabled": True}
        if shutil.which("redis-server"):
            redis = RedisServer().start()
            cache["redis_url"] = redis.url
            print(f"    Redis on {redis.url}")
        else:
            print("    redis-server not installed: the cache uses its in-process tier only")

        step("starting pgpilot in front of it")
        port, http_port = free_port(), free_port()
        config = {
            "listen": f"127.0.0.1:{port}", "pool_size": 8, "pool_mode": "transaction",
            "databases": {"postgres": {"host": pg.host, "port": pg.port, "dbname": "postgres", "user": "postgres"}},
            "query_log": {"enabled": True, "flush_interval": 0.2, "spool_dir": str(tmp / "spool")},
            "cache": cache,
            "admin": {"http_listen": f"127.0.0.1:{http_port}"},
            "learning": {"model_dir": str(tmp / "models")},
        }
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        log_file = open(tmp / "proxy.log", "wb")
        proxy = subprocess.Popen([python, "-m", "pgpilot", "serve", "-c", str(cfg_path)],
                                 stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", port, timeout=30)
        except TimeoutError:
            log_file.flush()
            print("pgpilot did not start; its log says:\n" + (tmp / "proxy.log").read_text(errors="replace")[-3000:])
            return 1
        print(f"    pgpilot on 127.0.0.1:{port} (transaction pooling, 8 backends); metrics on :{http_port}/metrics")
        print(f"    try it: psql -h 127.0.0.1 -p {port} -U postgres postgres")

        step("loading pgbench data (scale 5) directly into PostgreSQL")
        run([str(pg.bindir / "pgbench"), "-i", "-q", "-s", "5", "-h", pg.host, "-p", str(pg.port), "-U", "postgres",
             "postgres"], check=True)
        (tmp / "analytics.sql").write_text(ANALYTICS_SCRIPT)
        (tmp / "report.sql").write_text(REPORT_SCRIPT)

        phases = [
            ("TPC-B read/write, simple protocol, 8 clients", ["-c", "8", "-j", "2", "-T", str(per_phase), "-M", "simple"]),
            ("select-only, prepared statements, 8 clients", ["-S", "-c", "8", "-j", "2", "-T", str(per_phase), "-M", "prepared"]),
            ("mixed: point reads + per-branch aggregates + a report, 8 clients",
             ["-c", "8", "-j", "2", "-T", str(per_phase), "-M", "extended", "-b", "select-only@20",
              "-f", f"{tmp / 'analytics.sql'}@3", "-f", f"{tmp / 'report.sql'}@1"]),
        ]
        for name, pgb_args in phases:
            step(f"workload through pgpilot: {name} ({per_phase}s)")
            print("    " + pgbench(port, ["-n", *pgb_args], pg.bindir))
        time.sleep(1.5)   # let the log writer's last batch land

        step("what pgpilot logged (pgpilot.query_events, pgpilot.templates)")
        print(pg.psql("SELECT count(*) || ' statements logged, ' || count(DISTINCT fingerprint) || ' templates' "
                      "FROM pgpilot.query_events", check=False).strip() or "    (no events: see the proxy log)")
        top = pg.psql("SELECT calls, round(mean_ms::numeric, 3), left(normalized_sql, 70) FROM ("
                      " SELECT e.fingerprint, count(*) AS calls, avg(duration_us)/1000.0 AS mean_ms"
                      " FROM pgpilot.query_events e GROUP BY 1) s JOIN pgpilot.templates t USING (fingerprint)"
                      " ORDER BY calls * mean_ms DESC LIMIT 8", check=False)
        print("    calls | mean ms | template")
        for line in top.strip().splitlines():
            calls, mean, sql = line.split("|", 2)
            print(f"    {calls:>7} | {mean:>7} | {sql}")

        step("result cache")
        hits = pg.psql("SELECT count(*) FILTER (WHERE cache_outcome = 'hit') || ' answered from the cache out of ' "
                       "|| count(*) FROM pgpilot.query_events", check=False).strip()
        print(f"    {hits}")

        step("learning: collectors, workload analysis, models (pgpilot learn --once)")
        learn = run([python, "-m", "pgpilot", "learn", "-c", str(cfg_path), "--once"], timeout=900)
        print(_indent(learn.stdout or learn.stderr, 40))

        step("index advice for the logged workload (pgpilot advise indexes)")
        advise = run([python, "-m", "pgpilot", "advise", "indexes", "-c", str(cfg_path), "--format", "table"],
                     timeout=600)
        print(_indent(advise.stdout or advise.stderr, 30))

        step("pgpilot's own view: the admin console (SHOW POOLS) and Prometheus metrics")
        admin = run([str(pg.bindir / "psql"), "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                     "pgpilot", "-c", "SHOW POOLS"])
        print(_indent(admin.stdout or admin.stderr, 12))
        try:
            import urllib.request
            body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
            wanted = [ln for ln in body.splitlines() if ln.startswith(("pgpilot_queries_total", "pgpilot_transactions_total"))]
            print(_indent("\n".join(wanted) or "(no query counters exported)", 8))
        except OSError as e:
            print(f"    metrics endpoint not reachable: {e}")
        step("done: everything started here is being stopped and removed")
        return 0
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if redis is not None:
            redis.destroy()
        if pg is not None:
            pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def _indent(text: str, max_lines: int) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join("    " + ln for ln in lines)
