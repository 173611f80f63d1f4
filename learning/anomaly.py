"""The anomaly detector: robust per-template rules and an IsolationForest, distilled into one small tree model.

The teacher scores each finished statement from its anomaly features (proxy.features.anomaly_signals: robust
z-scores of time, rows and bytes against its template's history, novelty of the template for its sender,
the sender's recent errors, injection-shaped text and parameters) plus an IsolationForest's view of how
isolated the row is among normal traffic. The student, boosted trees (XGBoost), learns the teacher's
score on the training events and on synthetic variations of them that cover every anomaly class; the student
is what the proxy serves (a 100-tree IsolationForest converted as-is costs milliseconds per row in
onnxruntime, the student a few microseconds). Flagged statements get the class of their strongest rule.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from learning.logdata import EventLog, prepared_events, serving_context
from proxy.features import (ANOMALY_CLASSES, FEATURE_NAMES, SLOW_OVER_EXPECTED_LOG10, ServingContext,
                            anomaly_signals, transform_many)

log = logging.getLogger("pgpilot.learn")

KIND = "anomaly"
NAMES = FEATURE_NAMES[KIND]
_C = {name: i for i, name in enumerate(NAMES)}
# How much isolation beyond normal traffic adds to the rule score: less than the 0.2 that separates a familiar
# sender's new template (0.3) from a flag (0.5), so that a rare template of a known application (an analytical
# query run a few times a day) needs a second sign.
ISOLATION_WEIGHT = 0.15
ISOLATION_QUANTILE = 99.9  # training isolation scores above this percentile count as isolated
# At most this share of the training traffic may look like slow outliers (learning.anomaly_slow_tolerance): on
# a server whose timings are noisy (stalls of milliseconds), the slow threshold rises until noise stops flagging.
# Above the rate of real slow outliers in the training window it lets more of them through, but a busier test
# window then brings more false flags (docs/learning.md: 0.001 against 0.002 on two recordings).
SLOW_TOLERANCE = 0.001


@dataclass
class Teacher:
    """The rule score plus a bounded IsolationForest term (fit on training rows)."""

    forest: object
    iso_lo: float   # isolation score at the ISOLATION_QUANTILE of training rows
    iso_hi: float   # the most isolated training row
    slow_over_expected_log10: float = SLOW_OVER_EXPECTED_LOG10

    def isolation(self, X: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """How isolated rows are, 0 (like training traffic) to 1; raw: precomputed forest.score_samples(X)."""
        s = -(self.forest.score_samples(X) if raw is None else raw)  # higher: more isolated
        return np.clip((s - self.iso_lo) / max(self.iso_hi - self.iso_lo, 1e-6), 0.0, 1.0)

    def score(self, X: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        rules = anomaly_signals(X, self.slow_over_expected_log10).max(axis=1)
        return np.clip(rules + ISOLATION_WEIGHT * self.isolation(X, raw), 0.0, 1.5)


def fit_teacher(X: np.ndarray, seed: int = 0, slow_tolerance: float = SLOW_TOLERANCE) -> Teacher:
    from sklearn.ensemble import IsolationForest
    forest = IsolationForest(n_estimators=100, max_samples=min(256, len(X)), random_state=seed, n_jobs=1)
    forest.fit(X)
    s = -forest.score_samples(X)
    return Teacher(forest, float(np.percentile(s, ISOLATION_QUANTILE)), float(s.max()),
                   slow_threshold(X, slow_tolerance))


def slow_threshold(X: np.ndarray, tolerance: float = SLOW_TOLERANCE) -> float:
    """The slow-outlier threshold (log10 of times the expected time) that at most `tolerance` of training rows
    reach, never below SLOW_OVER_EXPECTED_LOG10."""
    slow_column = ANOMALY_CLASSES.index("slow_outlier")
    at_default = anomaly_signals(X)[:, slow_column] >= 0.6            # rows the default threshold flags
    over = (X[at_default, _C["ev_duration_log"]] - X[at_default, _C["ev_expected_log"]]) / np.log(10.0)
    candidates = np.sort(over)
    allowed = int(tolerance * len(X))
    if len(candidates) <= allowed:
        return SLOW_OVER_EXPECTED_LOG10
    return max(SLOW_OVER_EXPECTED_LOG10, float(candidates[len(candidates) - allowed - 1]) + 1e-3)


def augment(X: np.ndarray, rng: np.random.Generator, per_class: int) -> np.ndarray:
    """Synthetic variations of normal rows covering each anomaly class, so the student learns those regions."""
    if len(X) == 0:
        return X
    out = []

    def base(n: int) -> np.ndarray:
        return X[rng.integers(0, len(X), n)].copy()

    def z(value_log, p50_log, mad_log):
        return np.clip((value_log - p50_log) / (1.4826 * np.maximum(mad_log, 0.25)), -50, 50)

    known = X[:, _C["hist_known"]] > 0
    if known.any():
        Xk = X[known]
        # slow: the same statement, up to 1000x the time its template's fit expects of it
        b = Xk[rng.integers(0, len(Xk), per_class)].copy()
        k = rng.uniform(0.0, np.log(1000), per_class)
        b[:, _C["ev_duration_log"]] = b[:, _C["ev_expected_log"]] + k
        b[:, _C["ev_z_expected"]] = np.clip(k / (1.4826 * np.maximum(b[:, _C["ev_expected_mad_log"]], 0.25)), -50, 50)
        b[:, _C["ev_excess_expected_ms"]] = (np.expm1(b[:, _C["ev_duration_log"]])
                                             - np.expm1(b[:, _C["ev_expected_log"]])) / 1000.0
        b[:, _C["ev_z_duration"]] = z(b[:, _C["ev_duration_log"]], b[:, _C["hist_p50_log_us"]],
                                      b[:, _C["hist_mad_log_us"]])
        duration = np.expm1(b[:, _C["ev_duration_log"]])
        b[:, _C["ev_over_p95_log10"]] = np.log10(np.maximum(duration, 1e-3)
                                                 / np.maximum(np.expm1(b[:, _C["hist_p95_log_us"]]), 1.0))
        b[:, _C["ev_excess_ms"]] = (duration - np.expm1(b[:, _C["hist_p50_log_us"]])) / 1000.0
        out.append(b)
        # volume: many more rows and bytes, often from an unfamiliar sender
        b = Xk[rng.integers(0, len(Xk), per_class)].copy()
        k = rng.uniform(0.0, np.log(1e5), per_class)
        b[:, _C["ev_rows_log"]] = b[:, _C["hist_rows_p50_log"]] + k
        b[:, _C["ev_bytes_log"]] = b[:, _C["hist_bytes_p50_log"]] + k
        b[:, _C["ev_z_rows"]] = z(b[:, _C["ev_rows_log"]], b[:, _C["hist_rows_p50_log"]], b[:, _C["hist_rows_mad_log"]])
        b[:, _C["ev_z_bytes"]] = z(b[:, _C["ev_bytes_log"]], b[:, _C["hist_bytes_p50_log"]],
                                   b[:, _C["hist_bytes_mad_log"]])
        _unfamiliar(b, rng)
        out.append(b)
    # novelty: a template without history, from familiar and unfamiliar senders
    b = base(per_class)
    for name in ("hist_known", "hist_calls_log", "hist_p50_log_us", "hist_p95_log_us", "hist_mad_log_us",
                 "hist_rows_p50_log", "hist_rows_mad_log", "hist_bytes_p50_log", "hist_bytes_mad_log",
                 "hist_error_rate", "hist_apps", "ev_z_duration", "ev_z_rows", "ev_z_bytes", "ev_app_template_share",
                 "ev_over_p95_log10", "ev_excess_ms", "ev_expected_log", "ev_expected_mad_log", "ev_z_expected",
                 "ev_excess_expected_ms"):
        b[:, _C[name]] = 0.0
    b[:, _C["ev_new_template"]] = 1.0
    _unfamiliar(b, rng)
    out.append(b)
    # errors, alone and in bursts
    b = base(per_class)
    b[:, _C["ev_error"]] = 1.0
    b[:, _C["ev_error_probe"]] = (rng.random(per_class) < 0.5).astype(float)
    b[:, _C["ev_client_recent_errors"]] = rng.integers(1, 16, per_class)
    # ... some of them the first failure of a template that always fails (a probe sent again)
    again = rng.random(per_class) < 0.3
    b[again, _C["ev_client_recent_errors"]] = 1.0
    b[again, _C["hist_error_rate"]] = rng.uniform(0.8, 1.0, int(again.sum()))
    out.append(b)
    # injection shapes, strong and weak
    b = base(per_class)
    for name in ("inj_const_comparisons", "inj_statements", "inj_union_nulls", "inj_suspicious_funcs", "par_tautology",
                 "inj_catalog", "inj_comments", "par_quotes", "par_sql_meta", "inj_union", "stmt_is_ddl"):
        on = rng.random(per_class) < 0.25
        b[on, _C[name]] = rng.integers(1, 3, on.sum())
    b[:, _C["inj_statements"]] = np.maximum(b[:, _C["inj_statements"]], 1)
    out.append(b)
    return np.vstack(out).astype(np.float32)


def _unfamiliar(b: np.ndarray, rng: np.random.Generator) -> None:
    n = len(b)
    b[:, _C["ev_app_known"]] = (rng.random(n) < 0.5).astype(float)
    b[:, _C["ev_client_known"]] = (rng.random(n) < 0.5).astype(float)
    b[:, _C["ev_app_template_share"]] *= (rng.random(n) < 0.5)


def fit_student(X: np.ndarray, y: np.ndarray, seed: int = 0, n_estimators: int = 120, max_depth: int = 6):
    """The served model: boosted trees regressing the teacher's score (small enough for a few us per row).

    Rows the teacher scores above zero weigh more: they are rare, and the flag boundary is where they are.
    """
    import xgboost as xgb
    model = xgb.XGBRegressor(n_estimators=n_estimators, max_depth=max_depth, learning_rate=0.15, subsample=0.9,
                             tree_method="hist", n_jobs=1, random_state=seed)
    model.fit(X, y, sample_weight=np.where(y > 0.05, 5.0, 1.0))
    return model


def precision_recall(flagged: np.ndarray, labelled: np.ndarray) -> dict:
    tp = int((flagged & labelled).sum())
    fp = int((flagged & ~labelled).sum())
    fn = int((~flagged & labelled).sum())
    precision = tp / (tp + fp) if tp + fp else (1.0 if not labelled.any() else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {"precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


@dataclass
class AnomalyData:
    X_train: np.ndarray
    X_test: np.ndarray
    test_index: np.ndarray
    labels: np.ndarray        # per test row: class name or "" (unlabelled: normal)
    context: ServingContext
    window: dict


def build_dataset(event_log: EventLog, train: np.ndarray, test: np.ndarray, labels: dict | None = None, *,
                  max_train_rows: int = 60_000, max_test_rows: int = 200_000, seed: int = 0) -> AnomalyData:
    """Training rows (a sample) and every held-out event (up to max_test_rows, the earliest first), of the events
    whose parameters are loaded when they were logged."""
    rng = np.random.default_rng(seed)
    context = serving_context(event_log, train)
    # Events whose parameters were logged but not loaded (beyond learning.max_param_events) neither train nor
    # test: the proxy that logs parameters has them all, and without them the expected time falls back to the
    # rows-only fit, whose misses look like slow outliers. The held-out ones still replay, for the error windows.
    unloaded = event_log.has_params & np.fromiter((p is None for p in event_log.params), bool, len(event_log))
    tr = np.nonzero(train & ~unloaded)[0]
    if len(tr) > max_train_rows:
        # Keep every event that might be odd (errors, rare templates, unfamiliar senders): a uniform sample
        # would leave the student few of the rows its teacher flags.
        odd = tr[_possibly_odd(event_log, train, context)[tr]][: max_train_rows // 3]
        rest = np.setdiff1d(tr, odd, assume_unique=True)
        tr = np.sort(np.concatenate([odd, rng.choice(rest, max_train_rows - len(odd), replace=False)]))
    X_train = transform_many(prepared_events(event_log, context, tr, start=int(np.nonzero(train)[0][0])), KIND)
    context.reset_window()
    te = np.nonzero(test)[0][:max_test_rows]
    X_test = transform_many(prepared_events(event_log, context, te), KIND)
    if unloaded.any():
        keep = ~unloaded[te]
        X_test, te = X_test[keep], te[keep]
    labels = labels or {}
    y = np.array([labels.get((int(event_log.xact[i]), event_log.fingerprints[event_log.template[i]]), "")
                  for i in te], dtype=object)
    window = {"from": float(event_log.ts[train][0]), "to": float(event_log.ts[train][-1])} if train.any() else {}
    return AnomalyData(X_train, X_test, te, y, context, window)


def _possibly_odd(event_log: EventLog, train: np.ndarray, context: ServingContext) -> np.ndarray:
    """Events that failed, belong to a template without established history, or come from an unfamiliar sender."""
    calls = np.bincount(event_log.template[train], minlength=len(event_log.fingerprints))
    rare = calls < context.min_template_calls
    apps = np.array([a not in context.apps for a in event_log.apps])
    clients = np.array([c not in context.clients for c in event_log.clients])
    return event_log.error | rare[event_log.template] | apps[event_log.app] | clients[event_log.client]


@dataclass
class AnomalyResult:
    student: object
    teacher: Teacher
    metrics: dict
    threshold: float
    student_test_scores: np.ndarray


def train_and_evaluate(data: AnomalyData, *, threshold: float = 0.5, seed: int = 0,
                       augment_per_class: int | None = None, slow_tolerance: float = SLOW_TOLERANCE) -> AnomalyResult:
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    teacher = fit_teacher(data.X_train, seed, slow_tolerance)
    per_class = augment_per_class or max(500, len(data.X_train) // 10)
    X_fit = np.vstack([data.X_train, augment(data.X_train, rng, per_class)])
    y_fit = teacher.score(X_fit)
    student = fit_student(X_fit, y_fit, seed)
    fit_s = time.monotonic() - t0
    raw_test = teacher.forest.score_samples(data.X_test)
    teacher_test = teacher.score(data.X_test, raw_test)
    student_test = student.predict(data.X_test)
    flagged_t = teacher_test >= threshold
    flagged_s = student_test >= threshold
    labelled = data.labels != ""
    signals = anomaly_signals(data.X_test, teacher.slow_over_expected_log10)
    reasons = np.array(ANOMALY_CLASSES, dtype=object)[signals.argmax(axis=1)]
    metrics = {
        "threshold": threshold, "slow_over_expected_log10": teacher.slow_over_expected_log10,
        "train_rows": int(len(data.X_train)), "fit_rows": int(len(X_fit)),
        "fit_seconds": fit_s, "test_rows": int(len(data.X_test)), "labelled": int(labelled.sum()),
        "flag_rate": float(flagged_s.mean()) if len(flagged_s) else 0.0,
        "distillation": {
            "max_abs_diff": float(np.abs(student_test - teacher_test).max()) if len(teacher_test) else 0.0,
            "mean_abs_diff": float(np.abs(student_test - teacher_test).mean()) if len(teacher_test) else 0.0,
            "decision_agreement": float((flagged_t == flagged_s).mean()) if len(flagged_t) else 1.0},
    }
    if labelled.any():
        metrics["student"] = precision_recall(flagged_s, labelled)
        metrics["teacher"] = precision_recall(flagged_t, labelled)
        metrics["per_class"] = {}
        for cls in ANOMALY_CLASSES:
            of_class = data.labels == cls
            if of_class.any():
                metrics["per_class"][cls] = {
                    "labelled": int(of_class.sum()), "recall": float(flagged_s[of_class].mean()),
                    "reason_matches": float((reasons[of_class & flagged_s] == cls).mean())
                    if (of_class & flagged_s).any() else 0.0}
        by_reason = {}
        for cls in ANOMALY_CLASSES:
            as_cls = flagged_s & (reasons == cls)
            if as_cls.any():
                by_reason[cls] = {"flagged": int(as_cls.sum()), "precision": float(labelled[as_cls].mean())}
        metrics["by_reason"] = by_reason
        metrics["isolation_forest"] = isolation_baseline(teacher, raw_test, labelled)
    return AnomalyResult(student, teacher, metrics, threshold, student_test)


def isolation_baseline(teacher: Teacher, raw: np.ndarray, labelled: np.ndarray) -> dict:
    """The IsolationForest alone (raw: its score_samples on the test rows): at its own 'auto' threshold, and at
    the best threshold knowing the labels."""
    own = raw - teacher.forest.offset_ < 0   # decision_function < 0
    s = -raw
    best = {"f1": -1.0}
    for q in np.unique(np.percentile(s, np.linspace(80, 99.95, 60))):
        pr = precision_recall(s >= q, labelled)
        if pr["f1"] > best["f1"]:
            best = {**pr, "threshold": float(q)}
    return {"auto_threshold": precision_recall(own, labelled), "best_threshold_with_labels": best}
