"""pgpilot's result cache: answers reads from Redis (and an in-process L1) only when they are byte-identical to
what Postgres would return now, for this client (see docs/cache.md).

    cache = ResultCache(cfg.cache, {"app": "postgresql://..."}); await cache.start()
    v = cache.classify(sql, ctx)                     # Verdict: cacheable? which generation keys it reads
    entry, token = await cache.lookup(cache.key(ctx, sql), v.tables)
    cache.fill(key, v.tables, token, reply_bytes, exec_us, template)
    await cache.invalidate(cache.writes(sql, ctx))   # before the writer hears CommandComplete
"""
from proxy.cache.admission import AdmissionPolicy, HeuristicAdmission, TemplateStats
from proxy.cache.context import KEY_SETTINGS, CacheContext
from proxy.cache.engine import CATALOG, FLUSH, NO_KEY, ResultCache, TableKeys, Verdict

__all__ = ["ResultCache", "CacheContext", "Verdict", "TableKeys", "FLUSH", "CATALOG", "NO_KEY", "KEY_SETTINGS",
           "AdmissionPolicy", "HeuristicAdmission", "TemplateStats"]
