"""The change feed's two readers of the decoding slot: how fast a write that bypasses the proxy is invalidated,
and what reading the slot costs Postgres, under a background write load.

    python -m bench.cache_decoding [--rounds 3] [--seconds 15] [--rate 2000] [--json out.json]

Each round runs the streaming reader (replication protocol) and the polling reader (pg_logical_slot_get_changes
every decode_interval) in turn against the same load: a writer inserting --rate rows per second into a noise
table, and a probe updating a watched table every 100 ms directly on Postgres. Reported: the delay from commit
to the invalidation being recorded (the cache's own measurement, per batch read), and the CPU seconds the
decoding backend used per second of wall time (from /proc, Postgres runs on this machine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import asyncpg

from proxy.cache import ResultCache
from proxy.config import CacheConfig
from tests.support.services import PgCluster, RedisServer

READERS = ("stream", "poll")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def decoding_pid(dsn: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = "
                                   "'pgpilot-cache-decoding' ORDER BY backend_start DESC LIMIT 1")
    finally:
        await conn.close()


async def one_run(reader: str, pg: PgCluster, redis_url: str, seconds: float, rate: int, interval: float) -> dict:
    cfg = CacheConfig(enabled=True, redis_url=redis_url, decoding=reader, decode_interval=interval,
                      redis_timeout=0.5, key_prefix=f"dec{reader}{time.time_ns()}:")
    cache = ResultCache(cfg, {"postgres": pg.dsn})
    await cache.start()
    if not await cache.wait_ready(60):
        raise RuntimeError(f"not ready: {cache.stats()}")
    pid = await decoding_pid(pg.dsn)
    writer = await asyncpg.connect(pg.dsn)
    prober = await asyncpg.connect(pg.dsn)
    stop = time.monotonic() + seconds
    per_batch = max(1, rate // 20)

    async def write_load():
        while time.monotonic() < stop:
            await writer.execute(f"INSERT INTO noise (pad) SELECT repeat('x', 100) FROM generate_series(1, {per_batch})")
            await asyncio.sleep(0.05)

    async def probe():
        while time.monotonic() < stop:
            await prober.execute("UPDATE watched SET v = v + 1")
            await asyncio.sleep(0.1)

    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    await asyncio.gather(write_load(), probe())
    await asyncio.sleep(1.0)    # let the last changes arrive
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - cpu0) / elapsed if pid else float("nan")
    lag = cache.stats()["databases"]["postgres"]["decoding"]["lag"]
    samples = sorted(cache._dbs["postgres"].feed.lag.recent)
    await writer.close()
    await prober.close()
    await cache.stop()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))] if samples else float("nan")  # noqa: E731
    return {"reader": reader, "p50_ms": q(0.5) * 1000, "p99_ms": q(0.99) * 1000, "max_ms": lag["max_seconds"] * 1000,
            "batches": lag["batches"], "decoder_cpu_per_s": cpu}


async def main_async(args) -> list[dict]:
    pg = PgCluster(settings={"synchronous_commit": args.synchronous_commit}).start()
    rs = RedisServer().start()
    try:
        pg.psql("CREATE TABLE noise (id bigserial PRIMARY KEY, pad text); CREATE TABLE watched (v int);"
                "INSERT INTO watched VALUES (0)")
        results = []
        for r in range(args.rounds):
            for reader in READERS:
                res = await one_run(reader, pg, rs.url, args.seconds, args.rate, args.interval)
                res["round"] = r
                results.append(res)
                log(f"round {r + 1} {reader:6} p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                    f"decoder CPU {res['decoder_cpu_per_s']:.3f} s/s")
        return results
    finally:
        rs.destroy()
        pg.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=2000, help="rows per second written by the background load")
    ap.add_argument("--interval", type=float, default=0.01, help="the polling reader's decode_interval")
    ap.add_argument("--synchronous-commit", default="on", choices=["on", "off"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(f"{'reader':8} {'delay p50 ms':>12} {'p99 ms':>8} {'max ms':>8} {'decoder CPU s/s':>15}")
    for reader in READERS:
        rs = [x for x in results if x["reader"] == reader]
        med = lambda k: statistics.median(x[k] for x in rs)   # noqa: E731
        print(f"{reader:8} {med('p50_ms'):12.1f} {med('p99_ms'):8.1f} {max(x['max_ms'] for x in rs):8.1f} "
              f"{med('decoder_cpu_per_s'):15.3f}")
    ratios = [next(x for x in results if x["round"] == r and x["reader"] == "poll")["p50_ms"] /
              max(1e-9, next(x for x in results if x["round"] == r and x["reader"] == "stream")["p50_ms"])
              for r in range(args.rounds)]
    print(f"median per-round ratio of p50 delay, poll / stream: {statistics.median(ratios):.1f}; "
          f"synchronous_commit={args.synchronous_commit}, {args.rate} rows/s background load")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
