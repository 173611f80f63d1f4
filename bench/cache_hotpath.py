"""Result cache hot-path costs: what each engine call costs a session, and the Redis client under it.

    python -m bench.cache_hotpath [--rounds 5] [--calls 20000] [--json out.json]

Part 1 times the synchronous calls (classify, writes, key on a warm cache) per call, next to a reference:
a plain dict lookup keyed the same way (the floor for "look up a remembered answer").
Part 2 times one lookup round trip (hit from the in-process tier, hit from Redis, miss) sequentially and with
32 lookups in flight, and the same Lua lookup through redis-py's asyncio client (the reference the cache's
own RESP client replaced), interleaved round by round. Everything runs on a throwaway Postgres and Redis.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from proxy.cache import CacheContext, ResultCache
from proxy.cache.store import LOOKUP_LUA
from proxy.config import CacheConfig
from tests.support.services import PgCluster, RedisServer

READ = b"SELECT id, name, price FROM items WHERE id = 42"
WRITE = b"UPDATE items SET price = price + 1 WHERE id = 42"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


async def timed_async(make, calls: int, concurrency: int) -> float:
    """Microseconds of wall time per call, with `concurrency` calls in flight."""
    async def worker(n):
        for _ in range(n):
            await make()
    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return (time.perf_counter() - start) / (calls // concurrency * concurrency) * 1e6


async def run(rounds: int, calls: int) -> dict:
    import redis.asyncio as redis_py
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pg = PgCluster().start()
    rs = RedisServer().start()
    cache = None
    try:
        pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);"
                "INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 1000) g")
        cfg = CacheConfig(enabled=True, redis_url=rs.url, redis_timeout=1.0)
        cache = ResultCache(cfg, {"postgres": pg.dsn})
        await cache.start()
        assert await cache.wait_ready(30), cache.stats()
        ctx = CacheContext("postgres", "postgres", {"search_path": '"$user", public', "TimeZone": "UTC"})
        while cache.classify(READ, ctx).reason == "pending":
            await asyncio.sleep(0.01)
        v = cache.classify(READ, ctx)
        cache.writes(WRITE, ctx)
        key = cache.key(ctx, READ)
        reference = {(READ, ctx.scope): v}
        miss_key = cache.key(ctx, b"SELECT 'never filled'")
        _, token = await cache.lookup(key, v.tables)
        cache.fill(key, v.tables, token, b"D" * 200, exec_us=1000, template="bench")
        await asyncio.sleep(0.1)

        client = redis_py.Redis.from_url(rs.url, retry=Retry(NoBackoff(), 0), socket_timeout=1.0)
        sha = await client.script_load(LOOKUP_LUA)
        # the store's key order (epoch, generation hashes, entries) and arguments (groups: field count and
        # fields; lookups: group index and the in-process copy's tag)
        gen_keys = (cache.store.epoch_key, cache.store.hash_key("postgres"), cache.store.entry_key(key))
        fields = v.tables.fields

        async def l1_hit():
            await cache.lookup(key, v.tables)

        async def redis_hit():
            cache.l1.drop(key)
            await cache.lookup(key, v.tables)

        async def miss():
            await cache.lookup(miss_key, v.tables)

        async def redis_py_lookup():
            await client.evalsha(sha, 3, *gen_keys, 1, len(fields), *fields, 1, "")

        sync_cases = {
            "classify (warm)": lambda: cache.classify(READ, ctx),
            "writes (warm)": lambda: cache.writes(WRITE, ctx),
            "key": lambda: cache.key(ctx, READ),
            "reference: dict lookup": lambda: reference.get((READ, ctx.scope)),
        }
        async_cases = {"lookup, L1 hit": l1_hit, "lookup, Redis hit": redis_hit, "lookup, miss": miss,
                       "reference: redis-py EVALSHA": redis_py_lookup}
        results: dict[str, list[float]] = {}
        for r in range(rounds):
            for name, fn in sync_cases.items():
                results.setdefault(name, []).append(per_call_us(fn, calls))
            for name, fn in async_cases.items():
                for conc in (1, 32):
                    n = max(calls // 10, 320)
                    results.setdefault(f"{name} x{conc}", []).append(await timed_async(fn, n, conc))
            log(f"round {r + 1}/{rounds} done")
        await client.aclose()
        return {name: values for name, values in results.items()}
    finally:
        if cache is not None:
            await cache.stop()
        rs.destroy()
        pg.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    results = asyncio.run(run(args.rounds, args.calls))
    medians = {name: statistics.median(v) for name, v in results.items()}
    ref_sync = medians["reference: dict lookup"]
    print(f"{'call':34} {'us/call (median)':>17} {'x reference':>12}")
    for name, med in medians.items():
        if name.startswith(("classify", "writes", "key")):
            ratio = f"{med / ref_sync:.1f}"
        elif name.startswith("lookup"):
            conc = name.rsplit(" ", 1)[1]
            ratio = f"{med / medians[f'reference: redis-py EVALSHA {conc}']:.2f}"
        else:
            ratio = ""
        print(f"{name:34} {med:17.2f} {ratio:>12}")
    print("lookups: wall time per call (x1 = one at a time, x32 = 32 in flight); "
          "the lookup ratio is against redis-py running the same Lua script")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": results, "medians": medians}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
