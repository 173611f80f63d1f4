"""The in-process tier's own costs: a served hit and a store that evicts, GDSF against LRU, in-process.

    python -m bench.cache_l1 [--rounds 5] [--entries 20000] [--json out.json]

Each round fills one L1Cache per eviction with `entries` results (100-2000 bytes, 10 us-10 ms each, one template),
then times 200k served hits (get + hit, keys drawn uniformly) and 100k stores of new results into the full tier
(each evicts). The two evictions alternate within a round (LRU first in odd rounds, GDSF first in even ones);
the bench prints the medians and the median of the per-round GDSF / LRU ratios with their spread.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from proxy.cache.admission import TemplateStats
from proxy.cache.l1 import L1Cache, L1Entry

TABLES = ("db/public.t",)


def one(eviction: str, entries: int, seed: int) -> dict:
    rng = random.Random(seed)
    stats = TemplateStats("t")
    stats.executed(500)
    l1 = L1Cache(entries * 1300, eviction)
    keys = [b"k%d" % i for i in range(entries)]
    for k in keys:
        l1.put(k, L1Entry("tag", b"x" * rng.randint(100, 2000), stats, TABLES, rng.randint(10, 10_000)))
    probe = [keys[rng.randrange(entries)] for _ in range(200_000)]
    get, hit = l1.get, l1.hit
    start = time.perf_counter()
    for k in probe:
        e = get(k)
        if e is not None:
            hit(k, e)
    hit_us = (time.perf_counter() - start) / len(probe) * 1e6
    new = [(b"n%d" % i, b"x" * rng.randint(100, 2000), rng.randint(10, 10_000)) for i in range(100_000)]
    start = time.perf_counter()
    for k, payload, us in new:
        l1.put(k, L1Entry("tag", payload, stats, TABLES, us))
    put_us = (time.perf_counter() - start) / len(new) * 1e6
    return {"hit_us": hit_us, "put_us": put_us, "evictions": l1.evictions, "turned_away": l1.turned_away}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--entries", type=int, default=20_000)
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"lru": [], "gdsf": []}
    for r in range(args.rounds):
        for eviction in (("lru", "gdsf") if r % 2 == 0 else ("gdsf", "lru")):
            runs[eviction].append(one(eviction, args.entries, seed=r))
    print(f"{'per call (us)':<26}{'lru':>8}{'gdsf':>8}{'gdsf/lru':>10}{'spread':>14}")
    for metric, label in (("hit_us", "served hit (get + hit)"), ("put_us", "store that evicts")):
        lru = [x[metric] for x in runs["lru"]]
        gdsf = [x[metric] for x in runs["gdsf"]]
        ratios = [g / l for l, g in zip(lru, gdsf)]
        print(f"{label:<26}{statistics.median(lru):>8.3f}{statistics.median(gdsf):>8.3f}"
              f"{statistics.median(ratios):>10.2f}{f'{min(ratios):.2f}-{max(ratios):.2f}':>14}")
    g = runs["gdsf"][0]
    print(f"stores: lru evicted {runs['lru'][0]['evictions']}; gdsf evicted {g['evictions']}, "
          f"turned away {g['turned_away']} (first round)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
