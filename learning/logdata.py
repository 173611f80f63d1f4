"""Reading the query log store into columnar arrays, and per-template statistics computed from them.

`load_log(conn, since)` reads pgpilot.query_events and pgpilot.templates (plus the collectors' plans and
table_stats when they exist) into an `EventLog`: numpy columns sorted by time, text columns dictionary-
encoded. `template_stats(log, mask)` turns a slice of it into the `TemplateStats` that proxy.features
consumes, so the learner's history features are computed from exactly the events it is allowed to see.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from proxy.features import (ServingContext, TemplateStats, expected_time, fit_basis, param_features,
                            parameter_key)

log = logging.getLogger("pgpilot.learn")

WRITE_KINDS = frozenset({"insert", "update", "delete", "merge", "copy"})


@dataclass
class Template:
    fingerprint: str
    normalized_sql: str
    kind: str
    tables_read: tuple[str, ...]
    tables_written: tuple[str, ...]
    first_seen: float
    sample_sql: str | None = None


@dataclass
class EventLog:
    """The query log as columns, one entry per event, sorted by ts."""

    ts: np.ndarray            # float64 epoch seconds
    template: np.ndarray      # int32 index into fingerprints
    duration_us: np.ndarray   # float64
    rows: np.ndarray          # float64, 0 when unknown
    bytes_out: np.ndarray     # float64
    error: np.ndarray         # bool
    app: np.ndarray           # int32 index into apps
    client: np.ndarray        # int32 index into clients
    xact: np.ndarray          # int64
    has_params: np.ndarray    # bool: parameters were logged
    key: np.ndarray           # int64 hash of the parameters (0 without); with template, identifies a result
    params: list              # tuple of parameter texts for loaded events, None otherwise
    database: np.ndarray      # int32 index into databases
    fingerprints: list[str]
    apps: list[str]
    clients: list[str]
    databases: list[str]
    templates: dict[str, Template] = field(default_factory=dict)
    plans: dict[str, dict] = field(default_factory=dict)          # fingerprint -> latest plan facts
    tables: dict[str, dict] = field(default_factory=dict)         # relname -> latest size facts
    stats_memo: dict = field(default_factory=dict, repr=False)    # template_stats results by mask digest
    sqlstate: np.ndarray | None = None  # int16 index into sqlstates per event ('' for success)
    sqlstates: list = field(default_factory=lambda: [""])

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def span_hours(self) -> float:
        return max((float(self.ts[-1]) - float(self.ts[0])) / 3600.0, 1.0 / 60.0) if len(self) else 0.0

    def template_of(self, i: int) -> Template | None:
        return self.templates.get(self.fingerprints[self.template[i]])

    def kinds(self) -> np.ndarray:
        """Statement kind per template index."""
        return np.array([self.templates[fp].kind if fp in self.templates else "other" for fp in self.fingerprints])

    def sqlstate_of(self, i: int) -> str | None:
        """Event i's SQLSTATE (None for a success; "E" for a failure whose code was not loaded)."""
        if not self.error[i]:
            return None
        return (self.sqlstates[self.sqlstate[i]] if self.sqlstate is not None else "") or "E"

    def event_dict(self, i: int) -> dict:
        """Event i as the dict proxy.features expects (before ServingContext.prepare)."""
        t = self.template_of(i)
        return {
            "sql": t.normalized_sql if t else "", "parameters": self.params[i], "ts": float(self.ts[i]),
            "fingerprint": self.fingerprints[self.template[i]], "duration_us": float(self.duration_us[i]),
            "rows": float(self.rows[i]), "bytes_out": float(self.bytes_out[i]),
            "sqlstate": self.sqlstate_of(i), "application_name": self.apps[self.app[i]],
            "client_addr": self.clients[self.client[i]],
        }


def time_split(event_log: EventLog, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train mask, test mask): the last holdout_fraction of the events (in time) are held out."""
    n = len(event_log)
    cut = int(round(n * (1.0 - holdout_fraction)))
    train = np.zeros(n, bool)
    train[:cut] = True
    return train, ~train


def _table_exists(conn, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def load_log(conn, since: dt.datetime | None = None, until: dt.datetime | None = None, *,
             max_param_events: int = 300_000, seed: int = 0) -> EventLog:
    """The log store's events in [since, until), with parameters for at most max_param_events of them (sampled)."""
    started = time.monotonic()
    where, args = ["true"], []
    if since is not None:
        where.append("ts >= %s")
        args.append(since)
    if until is not None:
        where.append("ts < %s")
        args.append(until)
    cond = " AND ".join(where)
    total, with_params = conn.execute(
        f"SELECT count(*), count(*) FILTER (WHERE parameters IS NOT NULL) FROM pgpilot.query_events WHERE {cond}",
        args).fetchone()
    fraction = 1.0 if with_params <= max_param_events else max_param_events / with_params
    conn.execute("SELECT setseed(%s)", (((seed % 1000) / 1000.0),))
    sql = f"""
        SELECT extract(epoch FROM ts)::float8, fingerprint, duration_us, coalesce(rows, 0), coalesce(bytes_out, 0),
               coalesce(sqlstate, ''), coalesce(application_name, ''), coalesce(host(client_addr), ''),
               coalesce(xact_id, 0), parameters IS NOT NULL,
               CASE WHEN parameters IS NULL THEN 0
                    ELSE hashtextextended(array_to_string(parameters, chr(31), chr(30)), 0) END,
               CASE WHEN parameters IS NOT NULL AND random() < {fraction!r} THEN parameters END,
               coalesce(database, '')
        FROM pgpilot.query_events WHERE {cond}"""
    n = int(total)
    ts = np.empty(n, np.float64)
    tmpl = np.empty(n, np.int32)
    dur = np.empty(n, np.float64)
    rows = np.empty(n, np.float64)
    nbytes = np.empty(n, np.float64)
    err = np.empty(n, bool)
    state = np.empty(n, np.int16)
    state_ids: dict[str, int] = {"": 0}
    app = np.empty(n, np.int32)
    client = np.empty(n, np.int32)
    xact = np.empty(n, np.int64)
    has_params = np.empty(n, bool)
    key = np.empty(n, np.int64)
    params: list = [None] * n
    database = np.empty(n, np.int32)
    db_ids: dict[str, int] = {}
    fp_ids: dict[str, int] = {}
    app_ids: dict[str, int] = {}
    client_ids: dict[str, int] = {}
    i = 0
    with conn.transaction(), conn.cursor(name="pgpilot_learn_events") as cur:
        cur.itersize = 20_000
        cur.execute(sql, args)
        for r in cur:
            if i >= n:
                break
            ts[i] = r[0]
            fp = r[1]
            tmpl[i] = fp_ids.setdefault(fp, len(fp_ids))
            dur[i] = r[2]
            rows[i] = r[3]
            nbytes[i] = r[4]
            err[i] = r[5] != ""
            state[i] = state_ids.setdefault(r[5], len(state_ids))
            app[i] = app_ids.setdefault(r[6], len(app_ids))
            client[i] = client_ids.setdefault(r[7], len(client_ids))
            xact[i] = r[8]
            has_params[i] = r[9]
            key[i] = r[10]
            if r[11] is not None:
                params[i] = tuple(r[11])
            database[i] = db_ids.setdefault(r[12], len(db_ids))
            i += 1
    n = i
    order = np.argsort(ts[:n], kind="stable")
    event_log = EventLog(
        ts=ts[:n][order], template=tmpl[:n][order], duration_us=dur[:n][order], rows=rows[:n][order],
        bytes_out=nbytes[:n][order], error=err[:n][order], app=app[:n][order], client=client[:n][order],
        xact=xact[:n][order], has_params=has_params[:n][order], key=key[:n][order],
        params=[params[j] for j in order], database=database[:n][order], fingerprints=list(fp_ids),
        apps=list(app_ids), clients=list(client_ids), databases=list(db_ids), sqlstate=state[:n][order],
        sqlstates=list(state_ids))
    for fp, normalized, kind, read, written, first_seen, sample in conn.execute(
            "SELECT fingerprint, normalized_sql, kind, coalesce(tables_read, '{}'), coalesce(tables_written, '{}'),"
            " extract(epoch FROM first_seen)::float8, sample_sql FROM pgpilot.templates"):
        if fp in fp_ids:
            event_log.templates[fp] = Template(fp, normalized, kind, tuple(read), tuple(written), first_seen, sample)
    event_log.plans = load_plans(conn)
    event_log.tables = load_table_sizes(conn)
    log.info("loaded %d events, %d templates, %d with parameters (%.0f%% kept) in %.1fs", n, len(fp_ids),
             with_params, 100 * fraction, time.monotonic() - started)
    return event_log


def load_plans(conn) -> dict[str, dict]:
    """The latest collected plan per fingerprint (pgpilot.plans), or {} before the collectors ran."""
    if not _table_exists(conn, "pgpilot.plans"):
        return {}
    out = {}
    for fp, cost, prows, width, nodes in conn.execute(
            "SELECT DISTINCT ON (fingerprint) fingerprint, total_cost, plan_rows, plan_width, node_types"
            " FROM pgpilot.plans ORDER BY fingerprint, ts DESC"):
        out[fp] = {"plan_cost": cost, "plan_rows": prows, "plan_width": width, "plan_nodes": list(nodes or [])}
    return out


def load_table_sizes(conn) -> dict[str, dict]:
    """The latest size of every table (pgpilot.table_stats), by relname and schema.relname."""
    if not _table_exists(conn, "pgpilot.table_stats"):
        return {}
    out = {}
    for schema, rel, total, live in conn.execute(
            "SELECT DISTINCT ON (database, schemaname, relname) schemaname, relname, total_bytes, n_live_tup"
            " FROM pgpilot.table_stats ORDER BY database, schemaname, relname, ts DESC"):
        facts = {"bytes": float(total or 0), "rows": float(live or 0)}
        out[f"{schema}.{rel}"] = facts
        out.setdefault(rel, facts)
    return out


def load_labels(conn) -> dict[tuple[int, str], str]:
    """Anomaly labels written by the benchmark workloads (pgpilot_eval.labels), for evaluation only."""
    if not _table_exists(conn, "pgpilot_eval.labels"):
        return {}
    return {(x, fp): label for x, fp, label in conn.execute("SELECT xact_id, fingerprint, label FROM pgpilot_eval.labels")}


# ---------------------------------------------------------------------------------------------
# Per-template statistics

def _group_quantiles(group: np.ndarray, values: np.ndarray, n_groups: int, qs) -> np.ndarray:
    """Quantiles of values per group (n_groups x len(qs)), NaN for empty groups."""
    out = np.full((n_groups, len(qs)), np.nan)
    if len(values) == 0:
        return out
    order = np.lexsort((values, group))
    g, v = group[order], values[order]
    starts = np.searchsorted(g, np.arange(n_groups), side="left")
    ends = np.searchsorted(g, np.arange(n_groups), side="right")
    counts = ends - starts
    has = counts > 0
    for j, q in enumerate(qs):
        idx = starts + np.floor(q * np.maximum(counts - 1, 0)).astype(int)
        out[has, j] = v[idx[has]]
    return out


def _group_mad(group: np.ndarray, values: np.ndarray, medians: np.ndarray, n_groups: int) -> np.ndarray:
    dev = np.abs(values - medians[group])
    return _group_quantiles(group, dev, n_groups, (0.5,))[:, 0]


def table_write_rates(event_log: EventLog, mask: np.ndarray) -> dict[str, float]:
    """Writes per hour to each table, from the write statements among the masked events."""
    counts = np.bincount(event_log.template[mask], minlength=len(event_log.fingerprints))
    hours = _span_hours(event_log.ts[mask])
    rates: dict[str, float] = {}
    for tid, c in enumerate(counts):
        t = event_log.templates.get(event_log.fingerprints[tid])
        if c and t is not None and t.tables_written:
            for table in t.tables_written:
                rates[table] = rates.get(table, 0.0) + c / hours
    return rates


def _span_hours(ts: np.ndarray) -> float:
    return max((float(ts.max()) - float(ts.min())) / 3600.0, 1.0 / 60.0) if len(ts) else 1.0


def template_stats(event_log: EventLog, mask: np.ndarray | None = None) -> dict[str, TemplateStats]:
    """TemplateStats per fingerprint from the masked events (default: all), with plan and table facts.

    Computed once per distinct mask of a log (several models ask for the training part's statistics).
    """
    if mask is None:
        mask = np.ones(len(event_log), bool)
    digest = hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()
    if digest not in event_log.stats_memo:
        event_log.stats_memo[digest] = _template_stats(event_log, mask)
    return event_log.stats_memo[digest]


def _template_stats(event_log: EventLog, mask: np.ndarray) -> dict[str, TemplateStats]:
    n_t = len(event_log.fingerprints)
    g = event_log.template[mask]
    dur = event_log.duration_us[mask]
    rows = event_log.rows[mask]
    nbytes = event_log.bytes_out[mask]
    calls = np.bincount(g, minlength=n_t)
    hours = _span_hours(event_log.ts[mask])
    log_dur, log_rows, log_bytes = np.log1p(dur), np.log1p(rows), np.log1p(nbytes)
    q_dur = _group_quantiles(g, dur, n_t, (0.5, 0.95))
    med_log_dur = _group_quantiles(g, log_dur, n_t, (0.5,))[:, 0]
    med_log_rows = _group_quantiles(g, log_rows, n_t, (0.5,))[:, 0]
    med_log_bytes = _group_quantiles(g, log_bytes, n_t, (0.5,))[:, 0]
    mad_dur = _group_mad(g, log_dur, np.nan_to_num(med_log_dur), n_t)
    mad_rows = _group_mad(g, log_rows, np.nan_to_num(med_log_rows), n_t)
    mad_bytes = _group_mad(g, log_bytes, np.nan_to_num(med_log_bytes), n_t)
    sum_dur = np.bincount(g, weights=dur, minlength=n_t)
    errors = np.bincount(g, weights=event_log.error[mask].astype(float), minlength=n_t)
    first = np.full(n_t, np.inf)
    np.minimum.at(first, g, event_log.ts[mask])
    # distinct parameter keys per template, where parameters were logged
    hp = event_log.has_params[mask]
    keys_per_template = np.zeros(n_t)
    with_params = np.bincount(g[hp], minlength=n_t)
    if hp.any():
        pairs = np.unique(np.stack([g[hp].astype(np.int64), event_log.key[mask][hp]]), axis=1)
        keys_per_template = np.bincount(pairs[0], minlength=n_t).astype(float)
    # application shares
    app_counts: dict[int, dict[str, int]] = {}
    pairs = np.unique(np.stack([g.astype(np.int64), event_log.app[mask].astype(np.int64)]), axis=1,
                      return_counts=True)
    for (tid, aid), c in zip(pairs[0].T, pairs[1]):
        app_counts.setdefault(int(tid), {})[event_log.apps[aid]] = int(c)
    write_rates = table_write_rates(event_log, mask)
    out: dict[str, TemplateStats] = {}
    for tid in np.nonzero(calls)[0]:
        fp = event_log.fingerprints[tid]
        t = event_log.templates.get(fp)
        tables = t.tables_read if t else ()
        sizes = [event_log.tables.get(name) or event_log.tables.get(name.split(".")[-1]) for name in tables]
        c = int(calls[tid])
        shares = app_counts.get(int(tid), {})
        plan = event_log.plans.get(fp, {})
        out[fp] = TemplateStats(
            calls=c, calls_per_hour=c / hours, mean_us=float(sum_dur[tid] / c), p50_us=float(q_dur[tid, 0]),
            p95_us=float(q_dur[tid, 1]), mad_log_us=float(mad_dur[tid]),
            rows_p50=float(np.expm1(med_log_rows[tid])), rows_mad_log=float(mad_rows[tid]),
            bytes_p50=float(np.expm1(med_log_bytes[tid])), bytes_mad_log=float(mad_bytes[tid]),
            error_rate=float(errors[tid] / c),
            key_ratio=float(keys_per_template[tid] / with_params[tid]) if with_params[tid] else None,
            first_seen=float(first[tid]), n_apps=len(shares),
            app_share={a: k / c for a, k in shares.items()},
            write_rate=float(sum(write_rates.get(name, 0.0) for name in tables)),
            tables_bytes=float(sum(s["bytes"] for s in sizes if s)) if any(sizes) else None,
            tables_rows=float(sum(s["rows"] for s in sizes if s)) if any(sizes) else None,
            plan_cost=plan.get("plan_cost"), plan_rows=plan.get("plan_rows"), plan_width=plan.get("plan_width"),
            plan_nodes=plan.get("plan_nodes"))
    return out


FIT_MAX_EVENTS = 3000   # events per template the expected-time fit uses (evenly spaced), at most
FIT_RIDGE = 1.0         # ridge penalty on the fit's slopes (not on its intercept)
KEY_MIN_CALLS = 3       # calls with the same parameter values before their own typical time is kept
KEY_MIN_GAP = math.log(1.25)  # ... when it is at least this far (ln) from what the fit expects of them
KEY_MAX_PER_TEMPLATE = 256    # parameter values kept per template, the most frequent first


def fit_expected_times(event_log: EventLog, mask: np.ndarray, stats: dict[str, TemplateStats]) -> None:
    """Set each template's time_fit / time_fit_rows (see proxy.features.expected_time) from its successful
    masked events: ridge regressions of ln(1 + duration us) on the statement's rows, bytes and (time_fit) its
    parameter values, refit without the residuals beyond 3 robust deviations (stalls, anomalies)."""
    ok = mask & ~event_log.error
    order = np.argsort(event_log.template[ok], kind="stable")
    idx_all = np.nonzero(ok)[0][order]
    tmpl = event_log.template[idx_all]
    starts = np.searchsorted(tmpl, np.arange(len(event_log.fingerprints)))
    ends = np.searchsorted(tmpl, np.arange(len(event_log.fingerprints)), side="right")
    for tid, fp in enumerate(event_log.fingerprints):
        t = stats.get(fp)
        if t is None or ends[tid] - starts[tid] < 2:
            continue
        idx = idx_all[starts[tid]:ends[tid]]
        if len(idx) > FIT_MAX_EVENTS:
            idx = idx[np.linspace(0, len(idx) - 1, FIT_MAX_EVENTS).astype(int)]
        y = np.log1p(event_log.duration_us[idx])
        t.time_fit_rows = _robust_ridge(
            np.array([fit_basis(event_log.rows[i], event_log.bytes_out[i], None) for i in idx]), y)
        with_params = [k for k, i in enumerate(idx) if event_log.params[i] is not None]
        if len(with_params) >= 20:
            rows = [fit_basis(event_log.rows[idx[k]], event_log.bytes_out[idx[k]],
                              param_features(tuple(event_log.params[idx[k]]))) for k in with_params]
            t.time_fit = _robust_ridge(np.array(rows), y[with_params])
            t.key_times = None
            t.key_times = _key_times(event_log, idx_all[starts[tid]:ends[tid]], t) or None
        else:
            t.time_fit = None
            t.key_times = None


def _key_times(event_log: EventLog, idx: np.ndarray, t: TemplateStats) -> dict[str, float]:
    """Median ln(1 + us) per parameter values (proxy.features.parameter_key) seen at least KEY_MIN_CALLS times
    whose median is KEY_MIN_GAP or more from what the fit expects of them: costs that are not log-linear in the
    values (a customer's order count behind its id) are then expected of the values themselves."""
    groups: dict[str, list[int]] = {}
    pfs: dict[str, tuple] = {}
    for i in idx:
        params = event_log.params[i]
        if params is None:
            continue
        pf = param_features(tuple(params))
        key = parameter_key(pf)
        groups.setdefault(key, []).append(int(i))
        pfs.setdefault(key, pf)
    out = []
    for key, members in groups.items():
        if len(members) < KEY_MIN_CALLS:
            continue
        m = np.array(members)
        own = float(np.median(np.log1p(event_log.duration_us[m])))
        fitted = np.median([expected_time(t, event_log.rows[i], event_log.bytes_out[i], pfs[key])[0] for i in m])
        if abs(own - fitted) >= KEY_MIN_GAP:
            out.append((len(members), key, own))
    out.sort(reverse=True)
    return {key: own for _, key, own in out[:KEY_MAX_PER_TEMPLATE]}


def _robust_ridge(B: np.ndarray, y: np.ndarray) -> list[float]:
    """[coefficients..., lowest fitted value, highest fitted value, MAD of the residuals] of y ~ B."""
    keep = np.ones(len(y), bool)
    penalty = FIT_RIDGE * np.eye(B.shape[1])
    penalty[0, 0] = 0.0
    for _ in range(2):
        Bk, yk = B[keep], y[keep]
        w = np.linalg.solve(Bk.T @ Bk + penalty, Bk.T @ yk)
        r = y - B @ w
        mad = float(np.median(np.abs(r[keep] - np.median(r[keep]))))
        keep = np.abs(r - np.median(r[keep])) <= 3.0 * 1.4826 * max(mad, 0.1)
        if keep.sum() < max(2, B.shape[1]):
            keep[:] = True
    fitted = B[keep] @ w
    mad = float(np.median(np.abs(r[keep] - np.median(r[keep]))))
    return [float(c) for c in w] + [float(fitted.min()), float(fitted.max()), mad]


def serving_context(event_log: EventLog, mask: np.ndarray | None = None, error_window_s: float = 10.0, *,
                    min_template_calls: int = 20, min_known_share: float = 0.5, app_min_share: float = 0.002,
                    client_min_share: float = 0.0005) -> ServingContext:
    """The context exported beside the models: template statistics and the applications/clients that are
    familiar, i.e. sent at least app_min_share / client_min_share of the events (and at least 50 / 20)."""
    if mask is None:
        mask = np.ones(len(event_log), bool)
    n = int(mask.sum())
    app_counts = np.bincount(event_log.app[mask], minlength=len(event_log.apps))
    client_counts = np.bincount(event_log.client[mask], minlength=len(event_log.clients))
    apps = {event_log.apps[a] for a in np.nonzero(app_counts >= max(50, app_min_share * n))[0]}
    clients = {event_log.clients[c] for c in np.nonzero(client_counts >= max(20, client_min_share * n))[0]}
    stats = template_stats(event_log, mask)
    if not any(t.time_fit_rows is not None for t in stats.values()):
        fit_expected_times(event_log, mask, stats)
    return ServingContext(stats, apps, clients, error_window_s,
                          min_template_calls=min_template_calls, min_known_share=min_known_share)


def prepared_events(event_log: EventLog, context: ServingContext, indices, start: int | None = None) -> list[dict]:
    """Events at `indices` as prepared feature dicts, through one ServingContext as the proxy would see them.

    Every event from `start` (default: the first index) up to the last index passes through the context's
    error window, so sliding-window features count all traffic even when only a sample is returned.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return []
    wanted = np.zeros(len(event_log), bool)
    wanted[indices] = True
    first = int(indices.min()) if start is None else start
    out = []
    error = event_log.error
    for i in range(first, int(indices.max()) + 1):
        if wanted[i]:
            out.append(context.prepare(event_log.event_dict(i)))
        elif error[i]:  # only errors change what later events see
            context.observe({"ts": float(event_log.ts[i]), "sqlstate": "E" if error[i] else None,
                             "client_addr": event_log.clients[event_log.client[i]],
                             "application_name": event_log.apps[event_log.app[i]]})
    return out
