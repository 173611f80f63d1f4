"""Workload analysis: per-template profiles, arrival curves, scheduled vs ad-hoc, OLTP/OLAP and light/heavy classes.

`analyze_workload(event_log, thresholds)` returns a JSON-ready dict; `format_report(report)` renders it as the
text `pgpilot learn --report` prints. Classification rules are stated (thresholds in the `learning` config
section) and a learned light/heavy split is reported beside them for comparison:
  heavy    p50 duration >= heavy_p50_ms, or p50 result >= heavy_bytes
  OLAP     a read whose p50 >= olap_p50_ms and that aggregates, groups, joins or returns >= olap_rows rows
  OLTP     everything else (writes, point reads, short range reads)
  scheduled  >= scheduled_min_calls calls and >= scheduled_regularity of inter-arrival gaps within 10% of their
             median (a timer with jitter); the median gap is the period
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from learning.logdata import WRITE_KINDS, EventLog, _group_quantiles
from proxy.features import STATEMENT_FEATURES, statement_features

_IDX = {n: i for i, n in enumerate(STATEMENT_FEATURES)}


@dataclass
class Thresholds:
    heavy_p50_ms: float | None = 20.0   # None: use the learned split
    heavy_bytes: float = 1_000_000
    olap_p50_ms: float = 10.0
    olap_rows: float = 1000
    scheduled_min_calls: int = 6
    scheduled_regularity: float = 0.8
    workload_olap_share: float = 0.7    # OLAP share of DB time above which the workload is OLAP
    workload_oltp_share: float = 0.3    # ... below which it is OLTP; mixed in between


def learned_heavy_split_ms(p50_ms: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """A light/heavy boundary learned from template p50s: the 2-means split of log p50 (None if < 2 templates)."""
    values = np.log(np.maximum(p50_ms, 1e-3))
    if len(values) < 2 or np.ptp(values) == 0:
        return None
    w = np.ones_like(values) if weights is None else weights.astype(float)
    order = np.argsort(values)
    v, w = values[order], w[order]
    best, best_cost = None, np.inf
    for k in range(1, len(v)):
        lo, hi = v[:k], v[k:]
        wl, wh = w[:k], w[k:]
        ml, mh = np.average(lo, weights=wl), np.average(hi, weights=wh)
        cost = float(np.sum(wl * (lo - ml) ** 2) + np.sum(wh * (hi - mh) ** 2))
        if cost < best_cost:
            best, best_cost = k, cost
    return float(np.exp((v[best - 1] + v[best]) / 2.0))


def periodicity(ts: np.ndarray) -> dict:
    """Inter-arrival statistics of one template's calls: median gap, coefficient of variation, regularity."""
    if len(ts) < 3:
        return {"period_s": None, "gap_cv": None, "regularity": 0.0}
    gaps = np.diff(np.sort(ts))
    gaps = gaps[gaps > 0]
    if len(gaps) < 2:
        return {"period_s": None, "gap_cv": None, "regularity": 0.0}
    median = float(np.median(gaps))
    cv = float(np.std(gaps) / np.mean(gaps))
    regular = float(np.mean(np.abs(gaps - median) <= 0.1 * median))
    return {"period_s": median, "gap_cv": cv, "regularity": regular}


def analyze_workload(event_log: EventLog, thresholds: Thresholds | None = None, top: int = 25) -> dict:
    """The workload report: totals, per-template profiles with classes, arrival curves, workload class."""
    th = thresholds or Thresholds()
    n_t = len(event_log.fingerprints)
    if len(event_log) == 0:
        return {"events": 0, "templates": [], "workload": {"class": "empty"}}
    g = event_log.template
    dur_ms = event_log.duration_us / 1000.0
    calls = np.bincount(g, minlength=n_t)
    total_ms = np.bincount(g, weights=dur_ms, minlength=n_t)
    q = _group_quantiles(g, dur_ms, n_t, (0.5, 0.95, 0.99))
    rows_q = _group_quantiles(g, event_log.rows, n_t, (0.5,))[:, 0]
    bytes_q = _group_quantiles(g, event_log.bytes_out, n_t, (0.5,))[:, 0]
    errors = np.bincount(g, weights=event_log.error.astype(float), minlength=n_t)
    hours = event_log.span_hours
    learned_ms = learned_heavy_split_ms(q[calls > 0, 0], calls[calls > 0])
    heavy_ms = th.heavy_p50_ms if th.heavy_p50_ms is not None else (learned_ms or float("inf"))
    order = np.argsort(g, kind="stable")
    starts = np.searchsorted(g[order], np.arange(n_t), side="left")
    ends = np.searchsorted(g[order], np.arange(n_t), side="right")
    hour_of_day = ((event_log.ts % 86400) // 3600).astype(int)
    templates = []
    for tid in np.nonzero(calls)[0]:
        fp = event_log.fingerprints[tid]
        t = event_log.templates.get(fp)
        kind = t.kind if t else "other"
        sql = t.normalized_sql if t else ""
        f = statement_features(sql)
        p50, p95, p99 = (float(x) for x in q[tid])
        heavy = p50 >= heavy_ms or float(bytes_q[tid]) >= th.heavy_bytes
        analytic_shape = (f[_IDX["stmt_aggregates"]] > 0 or f[_IDX["stmt_group_by"]] > 0
                          or f[_IDX["stmt_joins"]] > 0 or float(rows_q[tid]) >= th.olap_rows)
        olap = kind == "select" and p50 >= th.olap_p50_ms and analytic_shape
        ts = event_log.ts[order[starts[tid]:ends[tid]]]
        per = periodicity(ts)
        scheduled = calls[tid] >= th.scheduled_min_calls and per["regularity"] >= th.scheduled_regularity
        hourly = np.bincount(hour_of_day[order[starts[tid]:ends[tid]]], minlength=24)
        templates.append({
            "fingerprint": fp, "sql": sql, "kind": kind, "tables": list(t.tables_read + t.tables_written) if t else [],
            "calls": int(calls[tid]), "calls_per_hour": float(calls[tid] / hours),
            "total_ms": float(total_ms[tid]), "time_share": float(total_ms[tid] / max(total_ms.sum(), 1e-9)),
            "mean_ms": float(total_ms[tid] / calls[tid]), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "rows_p50": float(rows_q[tid]), "bytes_p50": float(bytes_q[tid]),
            "error_rate": float(errors[tid] / calls[tid]),
            "apps": sorted({event_log.apps[a] for a in np.unique(event_log.app[order[starts[tid]:ends[tid]]])}),
            "workload_class": "OLAP" if olap else "OLTP", "weight_class": "heavy" if heavy else "light",
            "arrival": "scheduled" if scheduled else "ad-hoc", "period_s": per["period_s"] if scheduled else None,
            "gap_cv": per["gap_cv"], "regularity": per["regularity"], "hourly_calls": hourly.tolist(),
        })
    templates.sort(key=lambda r: -r["total_ms"])
    total_time = sum(r["total_ms"] for r in templates)
    olap_time = sum(r["total_ms"] for r in templates if r["workload_class"] == "OLAP")
    heavy_time = sum(r["total_ms"] for r in templates if r["weight_class"] == "heavy")
    olap_share = olap_time / total_time if total_time else 0.0
    writes = sum(r["calls"] for r in templates if r["kind"] in WRITE_KINDS)
    workload_class = ("OLAP" if olap_share >= th.workload_olap_share else
                      "OLTP" if olap_share <= th.workload_oltp_share else "mixed")
    days = np.floor(event_log.ts / 86400).astype(np.int64)
    day_ids, day_counts = np.unique(days, return_counts=True)
    return {
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "window": {"from": _iso(event_log.ts[0]), "to": _iso(event_log.ts[-1]), "hours": hours},
        "events": int(len(event_log)), "templates_count": len(templates),
        "errors": int(event_log.error.sum()),
        "thresholds": {**th.__dict__, "heavy_p50_ms_used": heavy_ms, "learned_heavy_p50_ms": learned_ms},
        "workload": {
            "class": workload_class, "olap_time_share": olap_share,
            "heavy_time_share": heavy_time / total_time if total_time else 0.0,
            "write_call_share": writes / max(1, len(event_log)),
            "calls_per_hour": len(event_log) / hours, "total_db_time_s": total_time / 1000.0,
            "scheduled_templates": sum(r["arrival"] == "scheduled" for r in templates),
        },
        "arrival": {
            "hourly_calls": np.bincount(hour_of_day, minlength=24).tolist(),
            "daily_calls": {dt.date.fromordinal(dt.date(1970, 1, 1).toordinal() + int(d)).isoformat(): int(c)
                            for d, c in zip(day_ids, day_counts)},
        },
        "templates": templates,
        "top": top,
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).isoformat(timespec="seconds")


def format_report(report: dict, width: int = 60) -> str:
    """The report as text: a workload summary, the top templates by DB time, the scheduled ones."""
    if not report.get("events"):
        return "workload: no events in the window\n"
    w = report["workload"]
    th = report["thresholds"]
    lines = [
        f"window      {report['window']['from']} .. {report['window']['to']} ({report['window']['hours']:.1f} h)",
        f"events      {report['events']:,} in {report['templates_count']} templates, {report['errors']:,} errors,"
        f" {w['calls_per_hour']:,.0f}/h, DB time {w['total_db_time_s']:,.1f} s",
        f"workload    {w['class']}: OLAP {100 * w['olap_time_share']:.0f}% of DB time, heavy "
        f"{100 * w['heavy_time_share']:.0f}%, writes {100 * w['write_call_share']:.0f}% of calls,"
        f" {w['scheduled_templates']} scheduled templates",
        f"thresholds  heavy p50 >= {th['heavy_p50_ms_used']:.1f} ms (learned split: "
        + (f"{th['learned_heavy_p50_ms']:.1f} ms" if th["learned_heavy_p50_ms"] else "n/a")
        + f"), OLAP p50 >= {th['olap_p50_ms']:.1f} ms",
        "",
        f"{'share':>6} {'calls':>8} {'p50 ms':>8} {'p95 ms':>8} {'rows':>7} {'class':<11} {'arrival':<14} sql",
    ]
    for r in report["templates"][:report.get("top", 25)]:
        arrival = r["arrival"] if r["arrival"] != "scheduled" else f"every {r['period_s']:.0f}s"
        sql = " ".join(r["sql"].split())
        lines.append(f"{100 * r['time_share']:5.1f}% {r['calls']:8,} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} "
                     f"{r['rows_p50']:7.0f} {r['workload_class'] + '/' + r['weight_class']:<11} {arrival:<14} "
                     f"{sql[:width]}")
    rest = len(report["templates"]) - report.get("top", 25)
    if rest > 0:
        lines.append(f"... {rest} more templates in the JSON report")
    hourly = report["arrival"]["hourly_calls"]
    peak = max(hourly) or 1
    bars = "".join(" .:-=+*#%@"[min(9, int(9 * c / peak))] for c in hourly)
    lines += ["", f"calls by hour of day (UTC, 00..23): |{bars}|"]
    return "\n".join(lines) + "\n"
