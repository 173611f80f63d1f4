"""The cache predictor: per template, the probability that caching its results pays, and the cache simulator that judges it.

Labels come from what the log shows happened. A read's result is reusable when the same template with the
same parameters is read again before any write to a table it reads (its next use). With parameters logged,
that is simulated exactly; without them, a template without $n parameters has one key, and a parametrized
template is estimated from its calls rate against the write rate of its tables with one distinct key per
call (conservative: it is never admitted until parameters, or a hash of them, are logged). Caching a template
pays when, over a window, the DB time its hits save exceeds a lookup cost per read plus a storage cost per
byte filled (`cache_lookup_us`, `cache_byte_cost_us`).

`simulate(trace, policy, capacity)` replays a logged trace through a byte-capacity cache that drops entries
when a table they read is written: never-cache, always-cache, the model's per-template admission, and an
oracle that knows the future (admits only results that will be reused before invalidation, evicts the entry
whose next use is furthest, Belady-style). Always-cache and the model evict as the proxy's in-process tier
does, by GreedyDual-Size-Frequency (the entry whose hits x execution time per byte, plus an inflation clock,
is least), or by LRU for comparison.
"""
from __future__ import annotations

import functools
import heapq
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from learning.logdata import WRITE_KINDS, EventLog, template_stats
from proxy.cache.l1 import GreedyDual, Held
from proxy.features import FEATURE_NAMES, transform_many

log = logging.getLogger("pgpilot.learn")

KIND = "cache"
_INF = np.iinfo(np.int64).max


@dataclass
class Trace:
    """Reads and writes in time order, with what the cache needs about each."""

    index: np.ndarray          # event indices
    template: np.ndarray       # template id per entry
    is_read: np.ndarray
    is_write: np.ndarray
    key: np.ndarray            # result key id per read (-1 for writes)
    duration_us: np.ndarray
    bytes_out: np.ndarray
    next_use: np.ndarray       # position of this result's next reuse before invalidation, or _INF
    reads_tables: list         # per template id: table ids it reads
    writes_tables: list        # per template id: table ids it writes

    def __len__(self) -> int:
        return len(self.index)

    @functools.cached_property
    def columns(self) -> tuple[list, list, list, list, list, list]:
        """(template, is_read, key, next_use, duration_us, bytes_out) as Python lists: a replay reads them item
        by item, and a list item costs a fraction of a numpy scalar."""
        return (self.template.tolist(), self.is_read.tolist(), self.key.tolist(), self.next_use.tolist(),
                self.duration_us.astype(float).tolist(), self.bytes_out.astype(float).tolist())


def _has_parameters(sql: str) -> bool:
    return "$" in sql


def build_trace(event_log: EventLog, mask: np.ndarray) -> Trace:
    """The masked events as a cache trace (successful reads and writes only)."""
    kinds = event_log.kinds()
    tmpl = event_log.template
    read_kind = kinds[tmpl] == "select"
    write_kind = np.isin(kinds[tmpl], list(WRITE_KINDS)) | (kinds[tmpl] == "ddl")
    sel = mask & ~event_log.error & (read_kind | write_kind)
    idx = np.nonzero(sel)[0]
    t = tmpl[idx]
    is_read = read_kind[idx]
    # Result keys: (template, parameter hash) with parameters; the template alone when it takes none;
    # a key of its own per call when parameters were taken but not logged.
    param_sql = np.array([_has_parameters(event_log.templates[fp].normalized_sql) if fp in event_log.templates
                          else True for fp in event_log.fingerprints])
    raw_key = np.where(event_log.has_params[idx], event_log.key[idx],
                       np.where(param_sql[t], -(idx.astype(np.int64) + 1), 0))
    pairs = np.stack([t.astype(np.int64), raw_key])
    _, key = np.unique(pairs, axis=1, return_inverse=True)
    key = np.where(is_read, key.ravel(), -1)
    # Tables are told apart by database: a write to app.orders does not touch tpch.orders.
    first = np.full(len(event_log.fingerprints), -1)
    seen = np.unique(event_log.template, return_index=True)
    first[seen[0]] = seen[1]
    table_ids: dict[str, int] = {}
    reads_tables, writes_tables = [], []
    for tid, fp in enumerate(event_log.fingerprints):
        tp = event_log.templates.get(fp)
        db = event_log.databases[event_log.database[first[tid]]] if first[tid] >= 0 else ""
        reads_tables.append([table_ids.setdefault(f"{db}.{_bare(x)}", len(table_ids))
                             for x in (tp.tables_read if tp else ())])
        written = tp.tables_written if tp else ()
        if tp is not None and tp.kind == "ddl" and not written:
            written = tp.tables_read  # DDL on a table: anything cached from it is gone
        writes_tables.append([table_ids.setdefault(f"{db}.{_bare(x)}", len(table_ids)) for x in written])
    next_use = _next_uses(t, is_read, key, reads_tables, writes_tables, len(table_ids))
    return Trace(idx, t, is_read, ~is_read, key, event_log.duration_us[idx], event_log.bytes_out[idx], next_use,
                 reads_tables, writes_tables)


def _bare(table: str) -> str:
    return table.split(".")[-1]


def _next_uses(template, is_read, key, reads_tables, writes_tables, n_tables) -> np.ndarray:
    n = len(template)
    next_use = np.full(n, _INF, dtype=np.int64)
    next_read: dict[int, int] = {}
    next_write = [_INF] * n_tables
    for i in range(n - 1, -1, -1):
        tid = int(template[i])
        if is_read[i]:
            k = int(key[i])
            nr = next_read.get(k, _INF)
            nw = min((next_write[x] for x in reads_tables[tid]), default=_INF)
            if nr < nw:
                next_use[i] = nr
            next_read[k] = i
        else:
            for x in writes_tables[tid]:
                next_write[x] = i
    return next_use


# ---------------------------------------------------------------------------------------------
# The simulator

@dataclass
class SimResult:
    policy: str
    capacity_bytes: float
    reads: int = 0
    hits: int = 0
    saved_us: float = 0.0
    filled_bytes: float = 0.0
    lookups: int = 0
    evictions: int = 0
    lookup_us: float = 0.0
    byte_cost_us: float = 0.0

    @property
    def net_us(self) -> float:
        """DB time saved minus what the cache cost: a lookup per read looked up, and the bytes stored."""
        return self.saved_us - self.lookup_us * self.lookups - self.byte_cost_us * self.filled_bytes

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.reads if self.reads else 0.0

    def as_dict(self) -> dict:
        return {"policy": self.policy, "capacity_bytes": self.capacity_bytes, "reads": self.reads,
                "hits": self.hits, "hit_ratio": self.hit_ratio, "db_time_saved_s": self.saved_us / 1e6,
                "filled_mb": self.filled_bytes / 1e6, "lookups": self.lookups, "evictions": self.evictions,
                "net_saved_s": self.net_us / 1e6}


EVICTIONS = ("gdsf", "lru")
EVICTION = "gdsf"    # what the proxy's in-process tier does (proxy/cache/l1.py): evaluate what is served


def simulate(trace: Trace, policy: str, capacity_bytes: float, admitted: set[int] | None = None, *,
             lookup_us: float = 0.0, byte_cost_us: float = 0.0, measure_from: int = 0,
             eviction: str = EVICTION) -> SimResult:
    """Replay a trace: policy is never | always | model (admit templates in `admitted`) | oracle.

    always and model evict by `eviction`: gdsf (GreedyDual-Size-Frequency: the entry of least
    clock + hits x execution time / bytes, the clock rising to each evicted priority) or lru; the oracle evicts
    the entry whose next use is furthest. The oracle looks up only the reads that will hit (it knows), the
    others every read they may cache. measure_from: trace position where counting starts; the entries before
    it only warm the cache.
    """
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {EVICTIONS}, not {eviction!r}")
    res = SimResult(policy, capacity_bytes, lookup_us=lookup_us, byte_cost_us=byte_cost_us)
    entries: dict[int, float] = OrderedDict() if eviction == "lru" else {}   # key -> bytes (lru: in LRU order)
    by_table: dict[int, set[int]] = {}
    tables_of: dict[int, list[int]] = {}
    used = 0.0
    oracle = policy == "oracle"
    order = GreedyDual() if eviction == "gdsf" and not oracle else None   # evicting as the proxy's L1 does
    heap: list[tuple[int, int]] = []     # oracle: (-next use, key), lazily invalidated
    next_of: dict[int, int] = {}
    held_by_key: dict[int, Held] = {}    # gdsf: what the order holds for each cached key

    def drop(k: int) -> None:
        nonlocal used
        used -= entries.pop(k)
        for x in tables_of.pop(k, ()):
            s = by_table.get(x)
            if s is not None:
                s.discard(k)
        next_of.pop(k, None)
        if order is not None:
            order.discard(k)
            del held_by_key[k]

    template, is_read, key, next_use, duration_us, bytes_out = trace.columns
    inf = int(_INF)
    for i in range(len(template)):
        if i == measure_from and i:
            res = SimResult(policy, capacity_bytes, lookup_us=lookup_us, byte_cost_us=byte_cost_us)
        tid = template[i]
        if not is_read[i]:
            for x in trace.writes_tables[tid]:
                victims = by_table.pop(x, None)
                if victims:
                    for k in list(victims):
                        if k in entries:
                            drop(k)
            continue
        res.reads += 1
        if policy == "never" or (policy == "model" and tid not in admitted):
            continue
        k = key[i]
        res.lookups += not oracle
        nu = next_use[i]
        if k in entries:
            res.hits += 1
            res.lookups += oracle
            res.saved_us += duration_us[i]
            if oracle:
                if nu == inf:
                    drop(k)
                else:
                    next_of[k] = nu
                    heapq.heappush(heap, (-nu, k))
            elif order is not None:
                order.hit(held_by_key[k])
            else:
                entries.move_to_end(k)
            continue
        if oracle and nu == inf:
            continue  # never reused before it is invalidated: the oracle does not store it
        size = bytes_out[i]
        if size > capacity_bytes:
            continue
        if order is not None:
            value = duration_us[i] / max(size, 1.0)
            priority = order.clock + value
        while used + size > capacity_bytes and entries:
            if oracle:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if next_of.get(victim) == -neg:
                        break
                if -neg < nu:  # everything cached is needed sooner than this result: do not store it
                    heapq.heappush(heap, (neg, victim))
                    break
                drop(victim)
            elif order is not None:
                victim = order.make_room(priority)
                if victim is None:   # the new result is the least valuable: it goes first
                    break
                drop(victim)
            else:
                drop(next(iter(entries)))
            res.evictions += 1
        if used + size > capacity_bytes:
            continue
        entries[k] = size
        used += size
        res.filled_bytes += size
        tables = trace.reads_tables[tid]
        tables_of[k] = tables
        for x in tables:
            by_table.setdefault(x, set()).add(k)
        if oracle:
            next_of[k] = nu
            heapq.heappush(heap, (-nu, k))
        elif order is not None:
            held_by_key[k] = held = Held(value)
            order.add(k, held, priority)
    return res


# ---------------------------------------------------------------------------------------------
# Labels and features

def template_value(trace: Trace, n_templates: int, lookup_us: float, byte_cost_us: float) -> dict[str, np.ndarray]:
    """Per template over a trace: reads, infinite-cache hits, DB time they save, bytes filled, net benefit (us)."""
    reads = np.bincount(trace.template[trace.is_read], minlength=n_templates).astype(float)
    hit = np.zeros(len(trace), bool)
    targets = trace.next_use[trace.next_use != _INF]
    hit[targets] = True
    hits = np.bincount(trace.template[hit], minlength=n_templates).astype(float)
    saved = np.bincount(trace.template[hit], weights=trace.duration_us[hit], minlength=n_templates)
    miss = trace.is_read & ~hit
    filled = np.bincount(trace.template[miss], weights=trace.bytes_out[miss], minlength=n_templates)
    net = saved - lookup_us * reads - byte_cost_us * filled
    return {"reads": reads, "hits": hits, "saved_us": saved, "filled_bytes": filled, "net_us": net}


def estimated_value(stats, lookup_us: float, byte_cost_us: float, reads: float) -> float:
    """Net benefit estimate for a template whose reads carry no logged parameters: P(next call before a write)."""
    rate, writes = float(stats.calls_per_hour or 0.0), float(stats.write_rate or 0.0)
    p_reuse = rate / (rate + writes) if rate + writes > 0 else 0.0
    hits = reads * p_reuse
    return hits * float(stats.p50_us or 0.0) - lookup_us * reads - byte_cost_us * (reads - hits) * float(
        stats.bytes_p50 or 0.0)


def window_masks(event_log: EventLog, mask: np.ndarray, windows: int) -> list[np.ndarray]:
    """The masked events cut into `windows` consecutive masks of equal event counts."""
    idx = np.nonzero(mask)[0]
    bounds = np.linspace(0, len(idx), windows + 1).astype(int)
    out = []
    for w in range(windows):
        wmask = np.zeros(len(event_log), bool)
        wmask[idx[bounds[w]:bounds[w + 1]]] = True
        out.append(wmask)
    return out


def window_ids(event_log: EventLog, mask: np.ndarray, windows: int, indices: np.ndarray) -> np.ndarray:
    """The window (as window_masks cuts the masked events) of each event index in `indices`."""
    pos = np.searchsorted(np.nonzero(mask)[0], indices)
    bounds = np.linspace(0, int(mask.sum()), windows + 1).astype(int)
    return np.clip(np.searchsorted(bounds, pos, side="right") - 1, 0, windows - 1)


@dataclass
class Samples:
    """One sample per read template per time window of the training part."""

    X: np.ndarray
    y: np.ndarray              # caching paid in that window (net > 0)
    net_us: np.ndarray         # what caching the template saved there, net of lookups and bytes stored
    fingerprints: list
    window: np.ndarray

    @property
    def weight(self) -> np.ndarray:
        """Sample weights: how much DB time rides on the decision (|net| plus one lookup), mean 1."""
        return weights_of(self.net_us)


def weights_of(net_us: np.ndarray) -> np.ndarray:
    w = np.abs(net_us) + 1.0
    return w / w.mean() if len(w) else w


PRIOR_READS = 10.0   # reads a template needs before its own reuse rate outweighs the workload's


def reuse_rates(trace: Trace, n_templates: int) -> tuple[np.ndarray, float]:
    """(per template, the whole trace) the share of reads an unbounded cache answers, remembering across the
    trace; per template shrunk towards the whole trace's rate by PRIOR_READS reads (empirical Bayes): a
    template read six times that happened to draw six different parameter values is not thereby never reused."""
    hit = np.zeros(len(trace), bool)
    hit[trace.next_use[trace.next_use != _INF]] = True
    reads = np.bincount(trace.template[trace.is_read], minlength=n_templates).astype(float)
    hits = np.bincount(trace.template[hit], minlength=n_templates).astype(float)
    overall = float(hits.sum() / reads.sum()) if reads.sum() else 0.0
    return (hits + PRIOR_READS * overall) / (reads + PRIOR_READS), overall


def saving_per_byte(event_log: EventLog, mask: np.ndarray) -> float:
    """DB time (us) an unbounded cache saves per byte it stores over the masked part, reuse rates as in
    window_samples: what a byte of a full cache is worth, the cost of the space a new result takes."""
    trace = build_trace(event_log, mask)
    rate, _ = reuse_rates(trace, len(event_log.fingerprints))
    r = trace.is_read
    p = rate[trace.template[r]]
    stored = float(((1.0 - p) * trace.bytes_out[r]).sum())
    return float((p * trace.duration_us[r]).sum()) / max(stored, 1.0)


def window_samples(event_log: EventLog, mask: np.ndarray, windows: int, byte_cost_us: float) -> Samples:
    """One sample per read template per time window; y = caching pays there, net_us = by how much (expected).

    The expected net of a template in a window is the DB time its reads there would save (reuse rate x their
    time) minus the storage cost of the bytes its misses store. Lookups cost the proxy, not the database:
    they are left out of the decision and charged in the evaluation's net figures. The reuse rate comes from the whole masked part replayed through an
    unbounded cache that remembers across windows (reuse_rates): cut per window, a template that runs a few
    times a day could never show a reuse, though its rare reuse saves the most (an analytical query repeated
    with the same parameters); and shrunk towards the workload's rate, so a rare template is judged by what
    is typical until its own history says otherwise.
    """
    n_t = len(event_log.fingerprints)
    trace = build_trace(event_log, mask)
    rate, _ = reuse_rates(trace, n_t)
    wid = window_ids(event_log, mask, windows, trace.index)
    calls_all = np.bincount(event_log.template[mask], minlength=n_t)
    X_parts, y_parts, nets, fps, window_ids_out = [], [], [], [], []
    for w, wmask in enumerate(window_masks(event_log, mask, windows)):
        if wmask.sum() < 50:
            continue
        sel = (wid == w) & trace.is_read
        t = trace.template[sel]
        reads = np.bincount(t, minlength=n_t).astype(float)
        time_read = np.bincount(t, weights=trace.duration_us[sel], minlength=n_t)
        bytes_read = np.bincount(t, weights=trace.bytes_out[sel], minlength=n_t)
        net_w = rate * time_read - byte_cost_us * (1.0 - rate) * bytes_read
        stats = template_stats(event_log, wmask)
        calls = np.bincount(event_log.template[wmask], minlength=n_t)
        logged = np.bincount(event_log.template[wmask & event_log.has_params], minlength=n_t) > calls / 2
        rows, labels = [], []
        for tid in np.nonzero(reads)[0]:
            fp = event_log.fingerprints[tid]
            tp = event_log.templates.get(fp)
            if fp not in stats or tp is None or not calls_all[tid]:
                continue
            net = net_w[tid]
            if not logged[tid] and _has_parameters(tp.normalized_sql):
                net = estimated_value(stats[fp], 0.0, byte_cost_us, reads[tid])
            rows.append({"sql": tp.normalized_sql, "template": stats[fp]})
            labels.append(int(net > 0))
            nets.append(float(net))
            fps.append(fp)
        if rows:
            X_parts.append(transform_many(rows, KIND))
            y_parts.append(np.array(labels))
            window_ids_out += [w] * len(rows)
    if not X_parts:
        return Samples(np.zeros((0, len(FEATURE_NAMES[KIND])), np.float32), np.zeros(0, int), np.zeros(0), [],
                       np.zeros(0, int))
    return Samples(np.vstack(X_parts), np.concatenate(y_parts), np.array(nets), fps, np.array(window_ids_out))


def fit_classifier(X: np.ndarray, y: np.ndarray, seed: int = 0, sample_weight: np.ndarray | None = None):
    """A small gradient-boosted classifier of "caching pays" (None when the labels have one class only).

    Weighted by the DB time at stake (Samples.weight), a probability above 0.5 means the expected net saving is
    positive: a template whose reuse is rare but saves seconds each time is admitted, one that saves a few
    microseconds now and then is not. Leaves hold at least MIN_LEAF samples, so one template's few windows
    (its lucky or unlucky draws of parameter values) cannot make a leaf of their own.
    """
    from sklearn.ensemble import GradientBoostingClassifier
    if len(np.unique(y)) < 2:
        return None
    model = GradientBoostingClassifier(n_estimators=60, max_depth=3, learning_rate=0.1, subsample=0.9,
                                       min_samples_leaf=MIN_LEAF, random_state=seed)
    model.fit(X, y, sample_weight=sample_weight)
    return model


MIN_LEAF = 10


def template_rows(event_log: EventLog, stats: dict) -> tuple[np.ndarray, list[int]]:
    """Cache feature rows of every read template (statistics from `stats`, blank history for unseen ones)."""
    rows, tids = [], []
    for tid, fp in enumerate(event_log.fingerprints):
        tp = event_log.templates.get(fp)
        if tp is None or tp.kind != "select":
            continue
        rows.append({"sql": tp.normalized_sql, "template": stats.get(fp)})
        tids.append(tid)
    X = transform_many(rows, KIND) if rows else np.zeros((0, len(FEATURE_NAMES[KIND])), np.float32)
    return X, tids


@dataclass
class CacheEvaluation:
    capacities: list
    table: list = field(default_factory=list)      # one dict per (capacity, policy)
    by_capacity: dict = field(default_factory=dict)

    def ratio(self, capacity, policy: str, reference: str = "oracle") -> float:
        row = self.by_capacity[capacity]
        ref = row[reference]["db_time_saved_s"]
        return row[policy]["db_time_saved_s"] / ref if ref > 0 else math.nan


def evaluate(trace: Trace, admitted: set[int] | list[set[int]], capacities_bytes: list[float],
             extra_policies: dict[str, set[int]] | None = None, *, lookup_us: float = 0.0,
             byte_cost_us: float = 0.0, evictions: tuple[str, ...] = (EVICTION,)) -> CacheEvaluation:
    """DB time saved (and net of the cache's costs) by each policy at each cache size over one trace.

    admitted: the model's templates, one set for every size or a list of sets, one per size (its threshold
    chosen for that size). always and model evict by evictions[0]; each further eviction adds the rows
    always_<eviction> and model_<eviction> (e.g. model_lru), with the same admission."""
    ev = CacheEvaluation(list(capacities_bytes))
    per_size = admitted if isinstance(admitted, list) else [admitted] * len(capacities_bytes)
    costs = {"lookup_us": lookup_us, "byte_cost_us": byte_cost_us}
    for cap, model_set in zip(capacities_bytes, per_size):
        row = {}
        for policy, adm in [("never", None), ("always", None), ("model", model_set), ("oracle", None),
                            *((name, a) for name, a in (extra_policies or {}).items())]:
            pol = policy if policy in ("never", "always", "oracle") else "model"
            if pol == "never":  # nothing to replay: it saves nothing and costs nothing
                r = SimResult("never", cap, reads=int(trace.is_read.sum())).as_dict()
            else:
                r = simulate(trace, pol, cap, adm, eviction=evictions[0], **costs).as_dict()
            r["policy"] = policy
            row[policy] = r
            ev.table.append(r)
        for eviction in evictions[1:]:
            for pol, adm in (("always", None), ("model", model_set)):
                r = simulate(trace, pol, cap, adm, eviction=eviction, **costs).as_dict()
                r["policy"] = f"{pol}_{eviction}"
                row[r["policy"]] = r
                ev.table.append(r)
        ev.by_capacity[cap] = row
    return ev


def distinct_result_bytes(trace: Trace) -> float:
    """Total bytes of the distinct read results in a trace (the size a cache needs to hold them all)."""
    reads = trace.is_read
    keys, first = np.unique(trace.key[reads], return_index=True)
    return float(trace.bytes_out[reads][first].sum())


def admitted_at(proba: np.ndarray, tids: list[int], threshold: float) -> set[int]:
    return {t for t, p in zip(tids, proba) if p >= threshold}


# 0.0 admits every read template (always-caching): in a cache that holds every reused result, admission
# cannot save more, only lose hits.
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def choose_threshold(model, event_log: EventLog, fit_mask: np.ndarray, val_mask: np.ndarray,
                     capacity_share: float, eviction: str = EVICTION) -> tuple[float, list]:
    """The admission probability that saves the most DB time on a validation window (ties: nearest to 0.5).

    The replay runs over the fit and validation parts together and counts from the validation window on, so
    the cache enters it warm, as a running cache would (a result cached before the window can hit inside it).
    The cache size is capacity_share of the distinct bytes read in the validation window; the cache evicts by
    `eviction` (as the proxy's L1 is configured to).
    """
    return choose_thresholds(model, event_log, fit_mask, val_mask, (capacity_share,), eviction)[0]


def choose_thresholds(model, event_log: EventLog, fit_mask: np.ndarray, val_mask: np.ndarray,
                      capacity_shares, eviction: str = EVICTION) -> list[tuple[float, list]]:
    """choose_threshold for each cache size in capacity_shares (the replays share one trace)."""
    stats = template_stats(event_log, fit_mask)
    X, tids = template_rows(event_log, stats)
    if not len(X):
        return [(0.5, []) for _ in capacity_shares]
    proba = model.predict_proba(X)[:, 1]
    trace = build_trace(event_log, fit_mask | val_mask)
    in_val = val_mask[trace.index]
    start = int(np.argmax(in_val)) if in_val.any() else len(trace)
    distinct = max(distinct_result_bytes(build_trace(event_log, val_mask)), 1.0)
    out = []
    for share in capacity_shares:
        tried = []
        for th in THRESHOLDS:
            saved = simulate(trace, "model", distinct * share, admitted_at(proba, tids, th),
                             measure_from=start, eviction=eviction).saved_us
            tried.append({"threshold": th, "saved_s": saved / 1e6})
        best = max(tried, key=lambda r: (round(r["saved_s"], 6), -abs(r["threshold"] - 0.5)))
        out.append((best["threshold"], tried))
    return out
