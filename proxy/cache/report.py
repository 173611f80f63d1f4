"""The result cache as operators see it: SHOW CACHE in the admin console and pgpilot_cache_* metrics.

Both read ResultCache.stats() when asked; nothing here runs per query.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TEXT, INT8, FLOAT8 = 25, 20, 701


def show_cache(cache):
    """SHOW CACHE: one row per figure (name, value, what it counts), bypass and refusal reasons included."""
    from proxy.admin import Result
    s = cache.stats()
    rows = [
        ("serving", str(s["serving"]).lower(), "lookups are answered (false: Redis down or generations unsure)"),
        ("hits", s["hits"], "answers from the cache"),
        ("hits_l1", s["hits_l1"], "of which from the in-process tier"),
        ("misses", s["misses"], "cacheable reads sent to Postgres"),
        ("lookup_batches", s["lookup_batches"], "Redis calls that answered lookups (several share one)"),
        ("fills", s["fills"], "entries stored"),
        ("fill_bytes", s["fill_bytes"], "bytes stored"),
        ("l1_entries", s["l1_entries"], "entries in the in-process tier"),
        ("l1_bytes", s["l1_bytes"], "bytes in the in-process tier"),
        ("l1_evictions", s["l1_evictions"], "entries the in-process tier evicted for room"),
        ("l1_turned_away", s["l1_turned_away"], "results worth less than every entry held, not kept in it (gdsf)"),
        ("invalidations", s["invalidations"], "writes recorded through the proxy"),
        ("write_analyses", s["write_analyses"], "statements analysed for the tables they write (one per shape)"),
        ("decoded_invalidations", s["decoded_invalidations"], "writes seen by logical decoding"),
        ("flushes", s["flushes"], "DDL, TRUNCATE or lost feed: everything invalidated"),
        ("invalidation_failures", s["invalidation_failures"], "writes that could not be recorded (cache stopped serving)"),
        ("decoding_lag_seconds", round(s["decoding_lag_seconds"], 4), "commit to invalidation, last"),
        ("decoding_lag_max_seconds", round(s["decoding_lag_max_seconds"], 4), "commit to invalidation, max"),
        ("templates", s["templates"], "templates the admission policy tracks"),
    ]
    rows += [(f"bypass:{k}", v, "lookups that went to Postgres for this reason") for k, v in sorted(s["bypass"].items())]
    rows += [(f"uncacheable:{k}", v, "statements refused by the safety analysis") for k, v in
             sorted(s["uncacheable"].items())]
    rows += [(f"fill_rejected:{k}", v, "results not stored") for k, v in sorted(s["fills_rejected"].items())]
    return Result([("name", TEXT), ("value", TEXT), ("meaning", TEXT)], [(n, str(v), m) for n, v, m in rows])


def metric_families(cache):
    s = cache.stats()
    yield GaugeMetricFamily("pgpilot_cache_serving", "1 when the cache answers lookups", value=int(bool(s["serving"])))
    for name, key, doc in (("hits", "hits", "Reads answered from the cache"),
                           ("l1_hits", "hits_l1", "Reads answered from the in-process tier"),
                           ("misses", "misses", "Cacheable reads sent to Postgres"),
                           ("fills", "fills", "Results stored in the cache"),
                           ("fill_bytes", "fill_bytes", "Bytes stored in the cache"),
                           ("l1_evictions", "l1_evictions", "Entries the in-process tier evicted for room"),
                           ("l1_turned_away", "l1_turned_away", "Results the in-process tier did not keep (gdsf)"),
                           ("invalidations", "invalidations", "Writes through the proxy recorded as invalidations"),
                           ("decoded_invalidations", "decoded_invalidations", "Writes seen through logical decoding"),
                           ("flushes", "flushes", "Whole-cache invalidations"),
                           ("invalidation_failures", "invalidation_failures", "Writes that could not be recorded")):
        yield CounterMetricFamily(f"pgpilot_cache_{name}", doc, value=s[key])
    bypass = CounterMetricFamily("pgpilot_cache_bypass", "Lookups that went to Postgres, by reason", labels=["reason"])
    for reason, n in sorted(s["bypass"].items()):
        bypass.add_metric([reason], n)
    yield bypass
    refused = CounterMetricFamily("pgpilot_cache_uncacheable", "Statements refused by the safety analysis, by reason",
                                  labels=["reason"])
    for reason, n in sorted(s["uncacheable"].items()):
        refused.add_metric([reason], n)
    yield refused
    yield GaugeMetricFamily("pgpilot_cache_l1_bytes", "Bytes in the in-process tier", value=s["l1_bytes"])
    yield GaugeMetricFamily("pgpilot_cache_l1_entries", "Entries in the in-process tier", value=s["l1_entries"])
    yield GaugeMetricFamily("pgpilot_cache_decoding_lag_seconds", "Commit to invalidation delay of the last decoded "
                            "write", value=s["decoding_lag_seconds"])
