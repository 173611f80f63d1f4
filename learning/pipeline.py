"""One learning pass: collect, load the log, analyze the workload, train, evaluate, export and register every model.

`learn_once(settings)` runs the steps below in order and returns a JSON-ready summary; each model step is
independent (one failing is reported and the others still run):
  collect   learning.collectors.run_collectors (statements, performance, resources, plans)
  load      the log's last learning.window_days days, the latest holdout_fraction held out
  analyze   the workload report (learning.analysis), written to <model_dir>/reports/workload.json
  time      the query time predictor vs the template-mean and Postgres-cost baselines
  anomaly   the distilled anomaly detector, on the labelled injected events when there are any
  cache     the cache admission model, replayed through the cache simulator against always/never/oracle
  cluster   workload classes (KMeans or DBSCAN)
Each model is exported to ONNX, checked against its native predictions, added to the registry and promoted
only if it beats the champion on the same held-out data.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from learning.analysis import Thresholds, analyze_workload
from learning.export import export_onnx, inference_cost_us, onnx_agreement
from learning.logdata import EventLog, load_labels, load_log, template_stats, time_split
from learning.registry import Registry
from proxy.models import ModelRejected

log = logging.getLogger("pgpilot.learn")


@dataclass
class LearnSettings:
    """What a learning pass needs: where the log is, where the models go, and the learning config section."""

    store_dsn: str
    model_dir: str
    learning: object                          # proxy.config.LearningConfig
    target_dsns: dict[str, str] = field(default_factory=dict)   # monitored database name -> DSN
    collect: bool = True
    seed: int = 0
    eviction: str = "gdsf"                    # cache.l1_eviction: how the proxy's L1 evicts, so the replays do

    def dsn_for_database(self, name: str) -> str | None:
        if name in self.target_dsns:
            return self.target_dsns[name]
        return _replace_dbname(self.store_dsn, name) if name else None


def _replace_dbname(dsn: str, dbname: str) -> str:
    from urllib.parse import urlparse, urlunparse
    u = urlparse(dsn)
    return urlunparse(u._replace(path="/" + dbname))


class Progress:
    """Step-by-step progress lines on the log, with the time each step took."""

    def __init__(self):
        self.started = time.monotonic()
        self.steps: list[dict] = []
        self._t = None
        self._name = None

    def begin(self, name: str, detail: str = "") -> None:
        self._t = time.monotonic()
        self._name = name
        log.info("[%5.1fs] %s%s", self._t - self.started, name, f": {detail}" if detail else "")

    def end(self, status: str = "ok", detail: str = "") -> None:
        seconds = time.monotonic() - self._t
        self.steps.append({"step": self._name, "status": status, "seconds": seconds, "detail": detail})
        log.info("[%5.1fs] %s %s in %.1fs%s", time.monotonic() - self.started, self._name, status, seconds,
                 f" ({detail})" if detail else "")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _champion_score(registry: Registry, kind: str, score_fn) -> float | None:
    """The current champion's score on this pass's held-out data (None: none, or it cannot be evaluated)."""
    try:
        champion = registry.load_champion(kind)
    except ModelRejected as e:
        log.warning("%s champion cannot be evaluated: %s", kind, e)
        return None
    if champion is None:
        return None
    try:
        return float(score_fn(champion))
    except Exception as e:  # a champion that cannot score this data is no reference
        log.warning("%s champion failed on the held-out data: %s", kind, e)
        return None


def _register(registry: Registry, kind: str, onnx_bytes: bytes, context_json: str | None, metrics: dict,
              metric: str, score: float, higher_is_better: bool, champion_score: float | None,
              window: dict) -> dict:
    sha = registry.add(onnx_bytes, {"kind": kind, "metric": metric, "score": score, "metrics": metrics,
                                    "training_window": window, "champion_score_same_data": champion_score},
                       context_json)
    promoted, reason = registry.promote(kind, sha, metric=metric, score=score, champion_score=champion_score,
                                        higher_is_better=higher_is_better)
    log.info("%s model %s: %s", kind, sha[:12], ("promoted: " if promoted else "kept as candidate: ") + reason)
    return {"sha256": sha, "promoted": promoted, "reason": reason, "metric": metric, "score": score,
            "champion_score": champion_score}


def _window(event_log: EventLog, mask: np.ndarray) -> dict:
    ts = event_log.ts[mask]
    if not len(ts):
        return {}
    iso = lambda v: dt.datetime.fromtimestamp(float(v), dt.timezone.utc).isoformat(timespec="seconds")  # noqa
    return {"from": iso(ts.min()), "to": iso(ts.max()), "events": int(mask.sum())}


# ---------------------------------------------------------------------------------------------

def run_collect(settings: LearnSettings, progress: Progress) -> dict:
    progress.begin("collect", "pg_stat_statements, performance, resources, plans")
    try:
        from learning.collectors import run_collectors
    except ImportError:
        progress.end("skipped", "collectors not installed")
        return {}
    try:
        summary = run_collectors(settings.store_dsn, settings.target_dsns or None,
                                 plans_min_calls=settings.learning.collect_plans_min_calls,
                                 retention_days=settings.learning.snapshot_retention_days)
    except Exception as e:  # collection is best effort: the log alone still trains every model
        log.warning("collectors failed: %s", e)
        progress.end("failed", str(e)[:120])
        return {"error": str(e)}
    rows = sum(v.get("rows", 0) for v in summary.values())
    notices = sum(len(v.get("notices", [])) for v in summary.values())
    progress.end("ok", f"{rows} rows, {notices} notices")
    return summary


def analysis_thresholds(cfg) -> Thresholds:
    return Thresholds(heavy_p50_ms=cfg.heavy_p50_ms, olap_p50_ms=cfg.olap_p50_ms,
                      scheduled_regularity=cfg.scheduled_regularity)


def load_window(conn, cfg, seed: int = 0) -> EventLog:
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=cfg.window_days)
    return load_log(conn, since, max_param_events=cfg.max_param_events, seed=seed)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, set):
        return sorted(v)
    return str(v)


def learn_once(settings: LearnSettings, conn) -> dict:
    """One full pass over the log store at `conn` (a psycopg connection); returns the summary."""
    cfg = settings.learning
    progress = Progress()
    registry = Registry(settings.model_dir)
    reports = Path(settings.model_dir) / "reports"
    summary: dict = {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "models": {}}
    if settings.collect:
        summary["collect"] = run_collect(settings, progress)
    progress.begin("load", f"last {cfg.window_days:g} days of pgpilot.query_events")
    event_log = load_window(conn, cfg, settings.seed)
    labels = load_labels(conn)
    progress.end("ok", f"{len(event_log):,} events, {len(event_log.fingerprints)} templates")
    summary["events"] = len(event_log)
    progress.begin("analyze", "workload report")
    report = analyze_workload(event_log, analysis_thresholds(cfg))
    write_json(reports / "workload.json", report)
    summary["workload"] = report.get("workload", {})
    progress.end("ok", f"{report.get('workload', {}).get('class', 'empty')} workload")
    if len(event_log) < cfg.min_events:
        log.info("only %d events (< learning.min_events %d): no models this time", len(event_log), cfg.min_events)
        summary["skipped_models"] = f"{len(event_log)} events < min_events {cfg.min_events}"
        summary["steps"] = progress.steps
        summary["seconds"] = progress.elapsed
        write_json(reports / "learn.json", summary)
        return summary
    train, test = time_split(event_log, cfg.holdout_fraction)
    window = _window(event_log, train)
    summary["training_window"] = window
    summary["holdout_window"] = _window(event_log, test)
    for name, step in (("time", train_time_model), ("anomaly", train_anomaly_model),
                       ("cache", train_cache_model), ("cluster", train_cluster_model)):
        progress.begin(name)
        try:
            result = step(settings, registry, event_log, train, test, window, labels=labels, report=report)
            summary["models"][name] = result
            progress.end("ok", result.get("headline", ""))
        except Exception as e:  # one model failing must not stop the others
            log.exception("%s model failed", name)
            summary["models"][name] = {"error": f"{type(e).__name__}: {e}"}
            progress.end("failed", f"{type(e).__name__}: {str(e)[:100]}")
    summary["steps"] = progress.steps
    summary["seconds"] = progress.elapsed
    write_json(reports / "learn.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Model steps

def train_time_model(settings: LearnSettings, registry: Registry, event_log: EventLog, train, test, window,
                     **_) -> dict:
    from learning import time_model as tm
    cfg = settings.learning
    data = tm.build_dataset(event_log, train, test, max_train_rows=cfg.max_train_rows, seed=settings.seed)
    cost_train = cost_test = None
    if cfg.explain_sample > 0:
        rng = np.random.default_rng(settings.seed)
        cost_train = np.full(len(data.X_train), np.nan)
        cost_test = np.full(len(data.X_test), np.nan)
        tr = rng.choice(len(data.X_train), min(cfg.explain_sample, len(data.X_train)), replace=False)
        te = rng.choice(len(data.X_test), min(cfg.explain_sample, len(data.X_test)), replace=False)
        cost_train[tr] = tm.explain_costs(event_log, data.train_index[tr], settings.dsn_for_database)
        cost_test[te] = tm.explain_costs(event_log, data.test_index[te], settings.dsn_for_database)
    result = tm.train_and_evaluate(data, budget_s=cfg.search_budget_seconds, folds=cfg.cv_folds,
                                   families=tuple(cfg.time_model_families), seed=settings.seed,
                                   cost_train=cost_train, cost_test=cost_test)
    metrics = result.metrics
    onnx_bytes = export_onnx(result.model, tm.KIND, algorithm=result.family, metrics=_brief_time(metrics),
                             training_window=window, extra={"target": "ln(duration_us)"})
    metrics["onnx"] = onnx_agreement(onnx_bytes, result.model.predict(data.X_test[:5000]), data.X_test[:5000])
    metrics["onnx"].update(inference_cost_us(onnx_bytes, data.X_test[:2000]))
    slowest = int(np.argmax(np.exp(data.y_test))) if len(data.y_test) else None
    if slowest is not None:
        metrics["example_explanation"] = {
            "template": event_log.templates[event_log.fingerprints[event_log.template[data.test_index[slowest]]]]
            .normalized_sql[:200], "actual_us": float(np.exp(data.y_test[slowest])),
            **tm.explain_prediction(result.model, data.X_test[slowest])}
    true_us = np.exp(data.y_test)
    by_db: dict[str, dict] = {}
    for k, name in enumerate(event_log.databases):
        rows = event_log.database[data.test_index] == k
        if rows.any():
            by_db[name] = {"model": tm.qerror_summary(tm.qerror(result.predictions_us[rows], true_us[rows])),
                           "template_mean": tm.qerror_summary(tm.qerror(data.mean_baseline_us[rows], true_us[rows]))}
    metrics["by_database"] = by_db
    p90 = metrics["time_split"]["model"]["p90"]
    champion = _champion_score(registry, tm.KIND, lambda m: float(np.percentile(
        tm.qerror(tm.to_us(m.run(data.X_test)), np.exp(data.y_test)), 90)))
    reg = _register(registry, tm.KIND, onnx_bytes, data.context.to_json(), metrics, "qerror_p90", p90, False,
                    champion, window)
    metrics["registry"] = reg
    ts = metrics["time_split"]
    metrics["headline"] = (f"{result.family}: q-error median {ts['model']['median']:.2f} p90 {p90:.2f} "
                           f"(template mean p90 {ts['template_mean']['p90']:.2f}"
                           + (f", Postgres cost p90 {metrics['cost_baseline']['postgres_cost']['p90']:.2f}"
                              if metrics.get("cost_baseline", {}).get("postgres_cost", {}).get("p90") else "")
                           + ")")
    return metrics


def _brief_time(m: dict) -> dict:
    return {"family": m["family"], "qerror_test": m["time_split"]["model"],
            "qerror_template_mean": m["time_split"]["template_mean"],
            "qerror_unseen_parameters": m["unseen_parameters"]["model"]}


def train_anomaly_model(settings: LearnSettings, registry: Registry, event_log: EventLog, train, test, window,
                        labels=None, **_) -> dict:
    from learning import anomaly as an
    cfg = settings.learning
    data = an.build_dataset(event_log, train, test, labels, seed=settings.seed)
    result = an.train_and_evaluate(data, threshold=cfg.anomaly_threshold, seed=settings.seed,
                                   slow_tolerance=cfg.anomaly_slow_tolerance)
    metrics = result.metrics
    brief = {k: metrics[k] for k in ("threshold", "flag_rate", "distillation") if k in metrics}
    if "student" in metrics:
        brief["labelled"] = metrics["student"]
    onnx_bytes = export_onnx(result.student, an.KIND, algorithm="distilled-xgboost", metrics=brief,
                             training_window=window, extra={"threshold": cfg.anomaly_threshold,
                                                            "classes": list(an.ANOMALY_CLASSES),
                                                            "slow_over_expected_log10": result.teacher.slow_over_expected_log10})
    sample = data.X_test[:5000]
    metrics["onnx"] = onnx_agreement(onnx_bytes, result.student.predict(sample), sample)
    metrics["onnx"].update(inference_cost_us(onnx_bytes, data.X_test[:2000]))
    labelled = data.labels != ""
    if labelled.any():
        metric, score = "f1", metrics["student"]["f1"]
        score_fn = lambda m: an.precision_recall(m.run(data.X_test) >= cfg.anomaly_threshold, labelled)["f1"]  # noqa
    else:
        teacher_flags = result.teacher.score(data.X_test) >= cfg.anomaly_threshold
        metric, score = "teacher_agreement", metrics["distillation"]["decision_agreement"]
        score_fn = lambda m: float(((m.run(data.X_test) >= cfg.anomaly_threshold) == teacher_flags).mean())  # noqa
    champion = _champion_score(registry, an.KIND, score_fn)
    metrics["registry"] = _register(registry, an.KIND, onnx_bytes, data.context.to_json(), metrics, metric, score,
                                    True, champion, window)
    if "student" in metrics:
        s = metrics["student"]
        metrics["headline"] = (f"precision {s['precision']:.3f} recall {s['recall']:.3f} on "
                               f"{metrics['labelled']} labelled events, flag rate {100 * metrics['flag_rate']:.2f}%")
    else:
        metrics["headline"] = (f"flag rate {100 * metrics['flag_rate']:.2f}%, agreement with the rules "
                               f"{metrics['distillation']['decision_agreement']:.4f}")
    return metrics


CACHE_CAPACITY_SHARES = (0.002, 0.01, 0.05, 0.25)   # of the distinct bytes read in the held-out window


def train_cache_model(settings: LearnSettings, registry: Registry, event_log: EventLog, train, test, window,
                      **_) -> dict:
    from learning import cache_model as cm
    from learning.logdata import serving_context
    cfg = settings.learning
    costs = {"lookup_us": cfg.cache_lookup_us, "byte_cost_us": cfg.cache_byte_cost_us}
    # Samples from 6 windows of the training part. What a stored byte costs is either the configured storage
    # cost or, where the cache is small, the DB time an average stored byte saves (the space's opportunity
    # cost); for each, a model fit on the first five windows (their own samples and reuse rates) and its best
    # admission threshold are replayed on the last window; the cost and threshold that save the most are kept
    # and the model is refit on all six.
    val_part = cm.window_masks(event_log, train, 6)[-1]
    fit_mask = train & ~val_part
    candidates = {"configured": (cfg.cache_byte_cost_us, cfg.cache_byte_cost_us),
                  "opportunity": (cm.saving_per_byte(event_log, fit_mask), cm.saving_per_byte(event_log, train))}
    chosen, threshold, tried, searched = "configured", 0.5, [], {}
    best = None
    for name, (fit_cost, _) in candidates.items():
        fit_part = cm.window_samples(event_log, fit_mask, 5, fit_cost)
        trial = cm.fit_classifier(fit_part.X, fit_part.y, settings.seed, fit_part.weight)
        if trial is None:
            continue
        th, th_tried = cm.choose_threshold(trial, event_log, fit_mask, val_part, CACHE_CAPACITY_SHARES[1],
                                           settings.eviction)
        saved = max(r["saved_s"] for r in th_tried) if th_tried else 0.0
        searched[name] = {"byte_cost_us": fit_cost, "threshold": th, "validation_saved_s": saved}
        if best is None or round(saved, 6) > round(best, 6):
            best, chosen, threshold, tried = saved, name, th, th_tried
    label_byte_cost = candidates[chosen][1]
    # The admission threshold per cache size (on the same validation replay): a small cache wants only the
    # templates whose results save the most per byte, a large one every template whose results come back.
    fit_part = cm.window_samples(event_log, fit_mask, 5, candidates[chosen][0])
    trial = cm.fit_classifier(fit_part.X, fit_part.y, settings.seed, fit_part.weight)
    by_share = (cm.choose_thresholds(trial, event_log, fit_mask, val_part, CACHE_CAPACITY_SHARES, settings.eviction)
                if trial is not None else [(threshold, tried)] * len(CACHE_CAPACITY_SHARES))
    thresholds = [th for th, _ in by_share]
    threshold = thresholds[1]
    samples = cm.window_samples(event_log, train, 6, label_byte_cost)
    X, y, w = samples.X, samples.y, samples.weight
    model = cm.fit_classifier(X, y, settings.seed, w)
    if model is None:
        return {"skipped": f"labels of one class only ({len(y)} samples)", "headline": "skipped: one class"}
    stats = template_stats(event_log, train)
    X_t, tids = cm.template_rows(event_log, stats)
    proba = model.predict_proba(X_t)[:, 1] if len(X_t) else np.zeros(0)
    admitted = cm.admitted_at(proba, tids, threshold)
    trace = cm.build_trace(event_log, test)
    total = max(cm.distinct_result_bytes(trace), 1.0)
    capacities = [total * s for s in CACHE_CAPACITY_SHARES]
    # Evicting as the proxy's in-process tier does (GDSF by default), and the other way with the same admission
    # for comparison (rows always_lru and model_lru, or always_gdsf and model_gdsf).
    other = next(e for e in cm.EVICTIONS if e != settings.eviction)
    evaluation = cm.evaluate(trace, [cm.admitted_at(proba, tids, th) for th in thresholds], capacities,
                             evictions=(settings.eviction, other), **costs)
    table = []
    for share, cap, th in zip(CACHE_CAPACITY_SHARES, capacities, thresholds):
        row = evaluation.by_capacity[cap]
        policies = ("never", "always", "model", "oracle", f"always_{other}", f"model_{other}")
        table.append({"capacity_share": share, "capacity_mb": cap / 1e6, "threshold": th,
                      "eviction": settings.eviction,
                      **{p: row[p]["db_time_saved_s"] for p in policies},
                      **{f"{p}_net": row[p]["net_saved_s"] for p in ("always", "model", "oracle")},
                      **{f"{p}_vs_oracle": evaluation.ratio(cap, p) for p in policies[1:] if p != "oracle"}})
    metrics = {"samples": int(len(y)), "positive_share": float(y.mean()), "threshold": threshold,
               "threshold_search": tried, "threshold_by_share": dict(zip(CACHE_CAPACITY_SHARES, thresholds)),
               "byte_cost": chosen, "label_byte_cost_us": label_byte_cost,
               "byte_cost_search": searched, "admitted_templates": len(admitted), "read_templates": len(tids),
               "test_reads": int(trace.is_read.sum()), "distinct_mb": total / 1e6, "simulation": table,
               "detail": evaluation.table, **costs}
    ref = capacities[1]
    score = evaluation.by_capacity[ref]["model"]["db_time_saved_s"]
    onnx_bytes = export_onnx(model, cm.KIND, algorithm="gradient-boosting-classifier",
                             metrics={"simulation": table, "samples": int(len(y))}, training_window=window,
                             extra={"admit_at": threshold, "label_byte_cost_us": label_byte_cost,
                                    "admit_at_by_cache_share": dict(zip(CACHE_CAPACITY_SHARES, thresholds)), **costs})
    if len(X_t):
        metrics["onnx"] = onnx_agreement(onnx_bytes, proba, X_t)

    def champion_saved(m) -> float:
        at = float(m.metadata.get("admit_at", 0.5))
        return cm.simulate(trace, "model", ref, cm.admitted_at(m.run(X_t), tids, at),
                           eviction=settings.eviction).saved_us / 1e6
    champion = _champion_score(registry, cm.KIND, champion_saved)
    context = serving_context(event_log, train)
    metrics["registry"] = _register(registry, cm.KIND, onnx_bytes, context.to_json(), metrics,
                                    "db_time_saved_s_at_1pct", score, True, champion, window)
    r = table[1]
    metrics["headline"] = (f"at a 1% cache: saves {r['model']:.2f}s = {100 * _nz(r['model_vs_oracle']):.0f}% of the "
                           f"oracle, always-cache {100 * _nz(r['always_vs_oracle']):.0f}%")
    return metrics


def _nz(v: float) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v


def train_cluster_model(settings: LearnSettings, registry: Registry, event_log: EventLog, train, test, window,
                        report=None, **_) -> dict:
    from learning import clustering as cl
    stats = template_stats(event_log, train)
    X, fps = cl.template_matrix(event_log, stats)
    result = cl.fit_clusters(X, fps, settings.seed)
    if result is None:
        return {"skipped": f"{len(X)} templates", "headline": "skipped: too few templates"}
    by_fp = {r["fingerprint"]: r for r in (report or {}).get("templates", [])}
    result.profiles = cl.profiles(result, stats, event_log, by_fp)
    metrics = {"algorithm": result.algorithm, "clusters": result.k, "silhouette": result.silhouette,
               "templates": len(fps), "candidates": result.candidates, "profiles": result.profiles}
    onnx_bytes = export_onnx(result.model, cl.KIND, algorithm=result.algorithm,
                             metrics={"silhouette": result.silhouette, "clusters": result.k}, training_window=window)
    metrics["onnx"] = onnx_agreement(onnx_bytes, result.model.predict(X).astype(float), X)
    champion = _champion_score(registry, cl.KIND, lambda m: cl.labels_silhouette(X, m.run(X)))
    metrics["registry"] = _register(registry, cl.KIND, onnx_bytes, None, metrics, "silhouette", result.silhouette,
                                    True, champion, window)
    metrics["headline"] = f"{result.algorithm}, {result.k} clusters, silhouette {result.silhouette:.2f}"
    return metrics


# ---------------------------------------------------------------------------------------------

def format_summary(summary: dict) -> str:
    """The pass as a short table: one line per step and per model."""
    lines = [f"{'step':<10} {'status':<8} {'seconds':>8}  detail"]
    for s in summary.get("steps", []):
        lines.append(f"{s['step']:<10} {s['status']:<8} {s['seconds']:8.1f}  {s['detail']}")
    models = summary.get("models", {})
    if models:
        lines += ["", f"{'model':<8} {'champion':<9} {'sha256':<14} reason"]
        for kind, m in models.items():
            reg = m.get("registry")
            if reg:
                lines.append(f"{kind:<8} {'yes' if reg['promoted'] else 'no':<9} {reg['sha256'][:12]:<14} "
                             f"{reg['reason']}")
            else:
                lines.append(f"{kind:<8} {'-':<9} {'-':<14} {m.get('error') or m.get('skipped', '')}")
    lines.append(f"\ntotal {summary.get('seconds', 0):.1f}s over {summary.get('events', 0):,} events")
    return "\n".join(lines) + "\n"
