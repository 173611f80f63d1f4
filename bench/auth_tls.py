"""What authentication and TLS cost: login rate and steady throughput through pgpilot and PgBouncer, side by side.

    python -m bench.auth_tls [--rounds 3] [--duration 5] [--json out.json] [--quick]

One private PostgreSQL cluster (fsync off, `pgbench -i -s 1`). In front of it, each in two flavours:
PgBouncer (the Debian package, transaction pooling) and pgpilot (transaction pooling, query log off), one
trusting every client and one asking for SCRAM-SHA-256 from an auth file while accepting TLS from clients
(certificate from a throwaway CA made with trustme). Same pool size for both.

Scenarios, each run as `pgbench -S` for --duration seconds:
  connect/trust, connect/scram, connect/scram+tls: `-C -c 4 -j 2`, a new connection per transaction, so the
      rate is the login rate (TCP, startup, authentication, TLS handshake, first query);
  steady/plain, steady/tls: `-c 16 -j 2` on persistent connections with SCRAM logins, plaintext or TLS.
Per round, per scenario, PgBouncer then pgpilot run back to back (A B A B ...), so noise hits both alike.
The table shows the median TPS of each, the median of the per-round ratios pgpilot/PgBouncer, and each
proxy's CPU time per transaction (psutil). Then --idle-clients connections (SCRAM logins, plaintext, then
TLS) are opened to each proxy and held, and the growth of its resident memory per client is reported. Over TLS libpq picks SCRAM-SHA-256-PLUS with pgpilot (channel
binding) and plain SCRAM-SHA-256 with PgBouncer, which does not offer it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import trustme

from bench.refs import PgBouncer
from proxy.auth import ScramVerifier
from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.services import PgCluster

DBNAME = "bench"
USER = "bench_user"
PASSWORD = "bench-password"

# name -> (auth flavour, sslmode, pgbench options)
SCENARIOS = {
    "connect/trust": ("trust", "disable", ["-C", "-c", "4", "-j", "2"]),
    "connect/scram": ("scram", "disable", ["-C", "-c", "4", "-j", "2"]),
    "connect/scram+tls": ("scram", "require", ["-C", "-c", "4", "-j", "2"]),
    "steady/plain": ("scram", "disable", ["-c", "16", "-j", "2"]),
    "steady/tls": ("scram", "require", ["-c", "16", "-j", "2"]),
}


@dataclass
class Run:
    round: int
    scenario: str
    target: str
    tps: float | None
    cpu_us_per_tx: float | None
    error: str | None = None


def make_tls(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 from a throwaway CA: (cert path, key path), readable by the postgres user."""
    cert = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


def pgbouncer(pg: PgCluster, scram: bool, tls: tuple[str, str] | None, pool_size: int) -> PgBouncer:
    bouncer = PgBouncer(pg.host, pg.port, pool_size=pool_size)
    if scram:
        # Later keys override the defaults written by PgBouncer(); files go where start() hands them to postgres.
        userlist = bouncer._tmp / "userlist.txt"
        userlist.write_text(f'"{USER}" "{ScramVerifier.from_password(PASSWORD)}"\n')
        cert, key = tls
        extra = {"auth_type": "scram-sha-256", "auth_file": userlist, "client_tls_sslmode": "allow",
                 "client_tls_cert_file": _copy(cert, bouncer._tmp), "client_tls_key_file": _copy(key, bouncer._tmp)}
        with open(bouncer.config_path, "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in extra.items())
    return bouncer.start()


def _copy(path: str, directory: Path) -> Path:
    target = directory / Path(path).name
    target.write_bytes(Path(path).read_bytes())
    target.chmod(0o600)
    return target


def pgpilot(pg: PgCluster, scram: bool, tls: tuple[str, str], pool_size: int, tmp: Path) -> ProxyProcess:
    config = {"databases": {DBNAME: upstream_entry(pg, DBNAME)}, "pool_size": pool_size,
              "log_level": "warning", "admin": {"http_listen": None}}
    if scram:
        userlist = tmp / "pgpilot-userlist.txt"
        userlist.write_text(f'"{USER}" "{ScramVerifier.from_password(PASSWORD)}"\n')
        config["auth"] = {"auth_file": str(userlist), "max_failures": 0}
        config["tls"] = {"client_mode": "allow", "client_cert_file": tls[0], "client_key_file": tls[1]}
    return ProxyProcess(config).start()


def pgbench(host: str, port: int, sslmode: str, options: list[str], duration: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE=sslmode)
    out = subprocess.run(
        ["pgbench", "-n", "-S", "-T", str(duration), *options, "-h", host, "-p", str(port), "-U", USER, DBNAME],
        capture_output=True, text=True, env=env, timeout=duration + 120)
    match = re.search(r"tps = ([\d.]+)", out.stdout)
    if out.returncode != 0 or not match:
        raise RuntimeError((out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout)
                           else f"pgbench exited {out.returncode}")
    return float(match.group(1))


def rss_per_client(host: str, port: int, pid: int, sslmode: str, clients: int) -> float:
    """Resident memory a proxy gains per idle client logged in (and kept) with sslmode, in KiB."""
    import psycopg

    def rss() -> int:
        proc = psutil.Process(pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    before = rss()
    conns = [psycopg.connect(host=host, port=port, user=USER, password=PASSWORD, dbname=DBNAME, sslmode=sslmode,
                             connect_timeout=30) for _ in range(clients)]
    try:
        return (rss() - before) / clients / 1024
    finally:
        for c in conns:
            c.close()


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (PgBouncer may run under a wrapper)."""
    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        total += sum(child.cpu_times()[:2])
    return total


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str) -> str:
    return "fail" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_tls", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per pgbench run")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--idle-clients", type=int, default=300, help="clients held open for the memory figure")
    parser.add_argument("--json", help="write every run and the summary here")
    parser.add_argument("--quick", action="store_true", help="smoke run: one round of 1 s runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.idle_clients = 1, 1, 20

    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-bench-auth-"))
    pg = PgCluster().start()
    started: list = []
    runs: list[Run] = []
    try:
        pg.psql(f"CREATE DATABASE {DBNAME}")
        pg.psql(f"CREATE ROLE {USER} LOGIN SUPERUSER")
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, DBNAME],
                       check=True, capture_output=True)
        tls = make_tls(tmp)
        targets = {}
        for flavour in ("trust", "scram"):
            scram = flavour == "scram"
            b = pgbouncer(pg, scram, tls, args.pool_size)
            p = pgpilot(pg, scram, tls, args.pool_size, tmp)
            started += [b, p]
            targets[("pgbouncer", flavour)] = (b.host, b.port, b.proc.pid)
            targets[("pgpilot", flavour)] = (p.host, p.port, p.proc.pid)
        total = args.rounds * len(SCENARIOS) * 2
        for r in range(args.rounds):
            for name, (flavour, sslmode, options) in SCENARIOS.items():
                for target in ("pgbouncer", "pgpilot"):
                    host, port, pid = targets[(target, flavour)]
                    cpu0 = cpu_seconds(pid)
                    try:
                        tps = pgbench(host, port, sslmode, options, args.duration)
                        cpu = (cpu_seconds(pid) - cpu0) / (tps * args.duration) * 1e6
                        runs.append(Run(r, name, target, tps, cpu))
                    except RuntimeError as e:
                        runs.append(Run(r, name, target, None, None, str(e)))
                    print(f"[{len(runs)}/{total}] round {r + 1} {name:18} {target:9} "
                          f"{fmt(runs[-1].tps, '.0f')} tps {runs[-1].error or ''}", file=sys.stderr, flush=True)
        memory = {}
        for target in ("pgbouncer", "pgpilot"):
            host, port, pid = targets[(target, "scram")]
            for sslmode in ("disable", "require"):
                memory[(target, sslmode)] = rss_per_client(host, port, pid, sslmode, args.idle_clients)
                print(f"idle clients: {target} sslmode={sslmode}: {memory[(target, sslmode)]:.1f} KiB each",
                      file=sys.stderr, flush=True)
    finally:
        for s in started:
            s.destroy() if isinstance(s, PgBouncer) else s.stop()
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = []
    print(f"\n{'scenario':18} {'PgBouncer tps':>13} {'pgpilot tps':>11} {'ratio':>6} "
          f"{'PgB us/tx':>9} {'pgpilot us/tx':>13}")
    for name in SCENARIOS:
        by = {t: [x for x in runs if x.scenario == name and x.target == t] for t in ("pgbouncer", "pgpilot")}
        ratios = [p.tps / b.tps for b, p in zip(by["pgbouncer"], by["pgpilot"]) if b.tps and p.tps]
        row = {"scenario": name,
               "pgbouncer_tps": median([x.tps for x in by["pgbouncer"]]),
               "pgpilot_tps": median([x.tps for x in by["pgpilot"]]),
               "ratio": median(ratios),
               "pgbouncer_cpu_us_per_tx": median([x.cpu_us_per_tx for x in by["pgbouncer"]]),
               "pgpilot_cpu_us_per_tx": median([x.cpu_us_per_tx for x in by["pgpilot"]])}
        summary.append(row)
        print(f"{name:18} {fmt(row['pgbouncer_tps'], '13.0f')} {fmt(row['pgpilot_tps'], '11.0f')} "
              f"{fmt(row['ratio'], '6.2f')} {fmt(row['pgbouncer_cpu_us_per_tx'], '9.0f')} "
              f"{fmt(row['pgpilot_cpu_us_per_tx'], '13.0f')}")
    print(f"\n{'idle client memory':18} {'PgBouncer KiB':>13} {'pgpilot KiB':>11}")
    for sslmode, label in (("disable", "plaintext"), ("require", "tls")):
        print(f"{label:18} {memory[('pgbouncer', sslmode)]:13.1f} {memory[('pgpilot', sslmode)]:11.1f}")
    errors = [r for r in runs if r.error]
    for e in errors[:5]:
        print(f"failed: round {e.round + 1} {e.scenario} {e.target}: {e.error}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "runs": [asdict(r) for r in runs], "summary": summary,
            "idle_client_kib": {f"{t}/{m}": v for (t, m), v in memory.items()}}, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
