"""Result cache on a read-heavy workload: throughput and latency against direct Postgres, hit ratio against an
oracle, Postgres time saved, and stale reads (which must be 0).

    python -m bench.cache_workload [--quick] [--rounds 3] [--seconds 8] [--workers 8] [--json out.json]

Workers play the session's part (classify -> lookup -> on a miss run the query on Postgres and fill) over
asyncpg, with a Zipfian mix of point reads and a heavy aggregate, writes through the cache's path (invalidate
before the writer continues) and writes that bypass it (a separate connection, caught by logical decoding).
Modes run interleaved in every round: direct (no cache), cache (heuristic admission), cache-always (admit
everything). The oracle hit ratio is that of an ideal cache invalidated per row (point reads) and per insert
(the aggregate), replayed over the same operations.
Stale read: a point read answered from the cache with a balance older than one whose write had completed
(invalidation acknowledged) before the read started; for a write that bypassed the proxy, older than its
commit by more than the measured decoding delay.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import asyncpg

from proxy.cache import CacheContext, ResultCache
from proxy.config import CacheConfig
from tests.support.services import PgCluster, RedisServer

MODES = ("direct", "cache", "cache-always")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def zipf_sampler(n: int, s: float, rng: random.Random):
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(weights)
    cum, acc = [], 0.0
    for w in weights:
        acc += w / total
        cum.append(acc)
    import bisect

    def draw() -> int:
        return min(bisect.bisect_left(cum, rng.random()), n - 1) + 1
    return draw


class AlwaysAdmit:
    def admit(self, stats) -> bool:
        return True


class Run:
    """Counters of one mode's run."""

    def __init__(self):
        self.reads = 0
        self.writes = 0
        self.hits = 0
        self.db_us = 0
        self.latency_us: dict[str, list[float]] = {"point": [], "heavy": []}
        self.stale = 0
        self.bypass_stale = 0            # older than a bypassing write committed before the read started
        self.bypass_stale_max_age = 0.0
        self.oracle_hits = 0


async def run_mode(mode: str, pg: PgCluster, redis_url: str, seconds: float, workers: int, seed: int,
                   accounts: int, write_share: float, bypass_interval: float) -> dict:
    cache = None
    if mode != "direct":
        cfg = CacheConfig(enabled=True, redis_url=redis_url, key_prefix=f"bench{seed}{mode}:", redis_timeout=0.5,
                          decode_interval=0.005)
        cache = ResultCache(cfg, {"postgres": pg.dsn}, admission=AlwaysAdmit() if mode == "cache-always" else None)
        await cache.start()
        if not await cache.wait_ready(30):
            raise RuntimeError(f"cache not ready: {cache.stats()}")
    ctx = CacheContext("postgres", "postgres", {"search_path": '"$user", public', "TimeZone": "UTC"})
    conns = [await asyncpg.connect(pg.dsn, statement_cache_size=0) for _ in range(workers)]
    bypass_conn = await asyncpg.connect(pg.dsn)
    run = Run()
    # Oracle state: per-row write counts, insert count, and the version each key was last read at.
    row_version: dict[int, int] = {}
    insert_version = 0
    seen: dict[str, int] = {}
    # Truth for staleness: balance known written (and acknowledged) per account, and bypass commits.
    acknowledged: dict[int, int] = {}
    bypassed: dict[int, list[tuple[float, int]]] = {}
    stop_at = time.monotonic() + seconds

    async def session(i: int, conn) -> None:
        nonlocal insert_version
        rng = random.Random(seed * 1000 + i)
        account = zipf_sampler(accounts, 1.1, rng)
        bucket = zipf_sampler(10, 1.1, rng)
        while time.monotonic() < stop_at:
            r = rng.random()
            if r < write_share:
                k = account()
                sql = f"UPDATE accounts SET balance = balance + 1 WHERE id = {k} RETURNING balance"
                balance = await conn.fetchval(sql)
                if cache is not None:
                    await cache.invalidate(cache.writes(sql.encode(), ctx))
                acknowledged[k] = max(acknowledged.get(k, 0), balance)
                row_version[k] = row_version.get(k, 0) + 1
                run.writes += 1
                continue
            if r < 0.85:
                k = account()
                kind, sql, version = "point", f"SELECT id, balance FROM accounts WHERE id = {k}", row_version.get(k, 0)
            else:
                k = bucket()
                kind, sql = "heavy", f"SELECT sum(amount), count(*) FROM orders WHERE account % 10 = {k - 1}"
                version = insert_version
            if seen.get(sql) == version:
                run.oracle_hits += 1
            seen[sql] = version
            started = time.perf_counter()
            read_start = time.monotonic()
            known = acknowledged.get(k, 0) if kind == "point" else 0
            payload = None
            raw = sql.encode()
            if cache is not None:
                v = cache.classify(raw, ctx)
                if v.cacheable:
                    key = cache.key(ctx, raw)
                    payload, token = await cache.lookup(key, v.tables)
                    if payload is not None:
                        run.hits += 1
                        if kind == "point":
                            served = int(payload.split(b",")[1])
                            if served < known:
                                run.stale += 1
                            else:
                                ages = [read_start - t for t, b in bypassed.get(k, ()) if b > served and t < read_start]
                                if ages:
                                    run.bypass_stale += 1
                                    run.bypass_stale_max_age = max(run.bypass_stale_max_age, max(ages))
                    else:
                        t0 = time.perf_counter()
                        row = await conn.fetchrow(sql)
                        exec_us = int((time.perf_counter() - t0) * 1e6)
                        run.db_us += exec_us
                        payload = ",".join(map(str, row)).encode()
                        cache.fill(key, v.tables, token, payload, exec_us, kind)
            if payload is None:
                t0 = time.perf_counter()
                await conn.fetchrow(sql)
                run.db_us += int((time.perf_counter() - t0) * 1e6)
            run.latency_us[kind].append((time.perf_counter() - started) * 1e6)
            run.reads += 1

    async def bypass_writer() -> None:
        nonlocal insert_version
        rng = random.Random(seed)
        account = zipf_sampler(accounts, 1.1, rng)
        while time.monotonic() < stop_at:
            await asyncio.sleep(bypass_interval)
            k = account()
            balance = await bypass_conn.fetchval(
                f"UPDATE accounts SET balance = balance + 1 WHERE id = {k} RETURNING balance")
            bypassed.setdefault(k, []).append((time.monotonic(), balance))
            row_version[k] = row_version.get(k, 0) + 1
            if rng.random() < 0.05:
                await bypass_conn.execute("INSERT INTO orders (account, amount) VALUES ($1, 1)", k)
                insert_version += 1

    started = time.perf_counter()
    await asyncio.gather(bypass_writer(), *(session(i, c) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - started
    stats = cache.stats() if cache is not None else {}
    for c in conns + [bypass_conn]:
        await c.close()
    if cache is not None:
        await cache.stop()

    def pct(values, q):
        return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 100 else float("nan")
    return {
        "mode": mode, "ops_per_s": (run.reads + run.writes) / elapsed, "reads": run.reads, "writes": run.writes,
        "hit_ratio": run.hits / run.reads if run.reads else 0.0,
        "oracle_hit_ratio": run.oracle_hits / run.reads if run.reads else 0.0,
        "db_ms": run.db_us / 1000, "stale": run.stale,
        "bypass_stale": run.bypass_stale, "bypass_stale_max_age_s": run.bypass_stale_max_age,
        "point_p50_us": pct(run.latency_us["point"], 50), "point_p99_us": pct(run.latency_us["point"], 99),
        "heavy_p50_us": pct(run.latency_us["heavy"], 50), "heavy_p99_us": pct(run.latency_us["heavy"], 99),
        "decoding_lag_max_s": stats.get("decoding_lag_max_seconds", 0.0),
        "fills": stats.get("fills", 0), "fills_rejected": stats.get("fills_rejected", {}),
        "bypass": stats.get("bypass", {}),
    }


async def main_async(args) -> list[dict]:
    pg = PgCluster().start()
    rs = RedisServer().start()
    try:
        log(f"loading {args.orders} orders, {args.accounts} accounts")
        pg.psql(f"""CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
                    INSERT INTO accounts SELECT g, 0 FROM generate_series(1, {args.accounts}) g;
                    CREATE TABLE orders (id serial PRIMARY KEY, account int, amount int);
                    INSERT INTO orders (account, amount)
                      SELECT g % {args.accounts}, g % 97 FROM generate_series(1, {args.orders}) g;
                    ANALYZE""")
        results = []
        for r in range(args.rounds):
            for mode in MODES:
                res = await run_mode(mode, pg, rs.url, args.seconds, args.workers, seed=r, accounts=args.accounts,
                                     write_share=args.write_share, bypass_interval=args.bypass_interval)
                res["round"] = r
                results.append(res)
                log(f"round {r + 1} {mode:13} {res['ops_per_s']:8.0f} ops/s  hits {res['hit_ratio']:.2f} "
                    f"(oracle {res['oracle_hit_ratio']:.2f})  stale {res['stale']}")
        return results
    finally:
        rs.destroy()
        pg.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke size: 1 round of 2 s, small tables")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--orders", type=int, default=100_000)
    ap.add_argument("--write-share", type=float, default=0.02, help="share of operations that write via the cache")
    ap.add_argument("--bypass-interval", type=float, default=0.05, help="seconds between bypassing writes")
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.accounts, args.orders = 1, 2.0, 1000, 20_000
    results = asyncio.run(main_async(args))
    print(f"{'mode':13} {'ops/s':>8} {'x direct':>8} {'hit':>5} {'oracle':>6} {'DB ms':>8} {'point p50':>9} "
          f"{'heavy p50':>9} {'heavy p99':>9} {'stale':>5} {'bypass-stale':>12} {'max age s':>9} {'lag max s':>9}")
    ratios = {m: [] for m in MODES}
    for r in range(args.rounds):
        base = next(x for x in results if x["round"] == r and x["mode"] == "direct")["ops_per_s"]
        for x in results:
            if x["round"] == r:
                ratios[x["mode"]].append(x["ops_per_s"] / base)
    for mode in MODES:
        rs = [x for x in results if x["mode"] == mode]
        med = lambda k: statistics.median(x[k] for x in rs)   # noqa: E731
        print(f"{mode:13} {med('ops_per_s'):8.0f} {statistics.median(ratios[mode]):8.2f} {med('hit_ratio'):5.2f} "
              f"{med('oracle_hit_ratio'):6.2f} {med('db_ms'):8.0f} {med('point_p50_us'):9.0f} "
              f"{med('heavy_p50_us'):9.0f} {med('heavy_p99_us'):9.0f} {sum(x['stale'] for x in rs):5d} "
              f"{sum(x['bypass_stale'] for x in rs):12d} {max(x['bypass_stale_max_age_s'] for x in rs):9.3f} "
              f"{max(x['decoding_lag_max_s'] for x in rs):9.3f}")
    print("medians over rounds; x direct = median of per-round ratios; stale = reads older than a write acknowledged "
          "through the cache (must be 0); bypass-stale = reads older than a write that bypassed the proxy, with the "
          "oldest such write's age next to the largest decoding delay measured (counts summed over rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
