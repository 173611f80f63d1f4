"""The query time predictor: ln(duration) from statement, parameter, plan, table and template-history features.

XGBoost, random forest and gradient boosting compete in a time-budgeted random search with time-ordered
cross-validation; the winner is refit and evaluated by q-error (max(pred/true, true/pred)) on held-out
events later in time, and on the held-out events whose parameter values never occurred in training. Two
baselines run on the same events: the template's historical mean, and a regression of ln(time) on ln(Postgres's
estimated cost) (EXPLAIN of each sampled statement with its parameters on the monitored database, or the
collected plan of its template). `explain_prediction` breaks one prediction into feature contributions
(XGBoost's TreeSHAP pred_contribs, or a path decomposition for scikit-learn trees).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np

from learning.logdata import EventLog, prepared_events, serving_context
from proxy.features import FEATURE_NAMES, ServingContext, transform_many

log = logging.getLogger("pgpilot.learn")

KIND = "time"
FAMILIES = ("xgboost", "random_forest", "gradient_boosting")
# Rows every family is cross-validated on (the same rows, so scores compare), and rows each family's final
# model is fit on (the exact-split ensembles are slow). Both are spread evenly over the training window.
SEARCH_ROWS = 10_000
FINAL_ROWS = {"xgboost": 150_000, "random_forest": 30_000, "gradient_boosting": 30_000}


def spread(n_rows: int, cap: int) -> np.ndarray:
    """At most `cap` row positions spread evenly over n_rows time-ordered rows (so every hour is represented)."""
    if n_rows <= cap:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, cap).astype(int))


def to_us(ln_us: np.ndarray) -> np.ndarray:
    """Microseconds from predicted ln(us), bounded so that a wild prediction stays a number (1 us .. ~3 h)."""
    return np.exp(np.clip(np.asarray(ln_us, dtype=float), 0.0, 23.0))


def qerror(pred_us: np.ndarray, true_us: np.ndarray) -> np.ndarray:
    p = np.maximum(np.asarray(pred_us, dtype=float), 1.0)
    t = np.maximum(np.asarray(true_us, dtype=float), 1.0)
    return np.maximum(p / t, t / p)


def qerror_summary(q: np.ndarray) -> dict:
    if len(q) == 0:
        return {"n": 0, "median": None, "p90": None, "p99": None}
    return {"n": int(len(q)), "median": float(np.median(q)), "p90": float(np.percentile(q, 90)),
            "p99": float(np.percentile(q, 99))}


@dataclass
class TimeData:
    """Feature rows for training and held-out evaluation, with what the baselines need."""

    X_train: np.ndarray
    y_train: np.ndarray           # ln(duration_us)
    X_test: np.ndarray
    y_test: np.ndarray
    test_index: np.ndarray        # event indices of the test rows
    train_index: np.ndarray
    unseen_params: np.ndarray     # bool per test row: its (template, parameters) never occurred in training
    mean_baseline_us: np.ndarray  # per test row: the template's historical mean
    context: ServingContext
    window: dict
    test_groups: list             # per test row: (template, parameter hash) when parameters were logged, else None


def _sample(rng: np.random.Generator, candidates: np.ndarray, cap: int) -> np.ndarray:
    if len(candidates) <= cap:
        return candidates
    return np.sort(rng.choice(candidates, size=cap, replace=False))


def build_dataset(event_log: EventLog, train: np.ndarray, test: np.ndarray, *, max_train_rows: int = 150_000,
                  max_test_rows: int = 50_000, seed: int = 0) -> TimeData:
    """Training and held-out rows (successful statements only), features through one ServingContext."""
    rng = np.random.default_rng(seed)
    ok = ~event_log.error
    loaded = np.array([p is not None for p in event_log.params]) & event_log.has_params
    # Prefer events whose parameters were loaded: without them the parameter features are blank.
    train_pool = np.nonzero(train & ok & (loaded | ~event_log.has_params))[0]
    test_pool = np.nonzero(test & ok & (loaded | ~event_log.has_params))[0]
    train_idx = _sample(rng, train_pool, max_train_rows)
    test_idx = _sample(rng, test_pool, max_test_rows)
    context = serving_context(event_log, train)
    X_train = transform_many(prepared_events(event_log, context, train_idx), KIND)
    context.reset_window()
    X_test = transform_many(prepared_events(event_log, context, test_idx), KIND)
    train_keys = set(zip(event_log.template[train & event_log.has_params].tolist(),
                         event_log.key[train & event_log.has_params].tolist()))
    unseen = np.array([bool(event_log.has_params[i]) and
                       (int(event_log.template[i]), int(event_log.key[i])) not in train_keys for i in test_idx])
    overall_mean = float(event_log.duration_us[train & ok].mean()) if (train & ok).any() else 1000.0
    means = []
    for i in test_idx:
        t = context.templates.get(event_log.fingerprints[event_log.template[i]])
        means.append(t.mean_us if t is not None else overall_mean)
    window = {"from": float(event_log.ts[train][0]), "to": float(event_log.ts[train][-1])} if train.any() else {}
    return TimeData(X_train, np.log(np.maximum(event_log.duration_us[train_idx], 1.0)), X_test,
                    np.log(np.maximum(event_log.duration_us[test_idx], 1.0)), test_idx, train_idx, unseen,
                    np.array(means), context, window,
                    [(int(event_log.template[i]), int(event_log.key[i])) if event_log.has_params[i] else None
                     for i in test_idx])


# ---------------------------------------------------------------------------------------------
# Estimated-cost baseline

def explain_costs(event_log: EventLog, indices: np.ndarray, dsn_for_database, *, timeout_ms: int = 2000,
                  budget_s: float = 30.0) -> np.ndarray:
    """Postgres's estimated total cost per event (NaN where unknown): EXPLAIN with the event's parameters, else
    its template's collected plan. Distinct (template, parameters) are explained once; stops at budget_s."""
    import psycopg

    costs = np.full(len(indices), np.nan)
    cache: dict[tuple, float] = {}
    conns: dict[str, object] = {}
    started = time.monotonic()
    try:
        for j, i in enumerate(indices):
            fp = event_log.fingerprints[event_log.template[i]]
            t = event_log.templates.get(fp)
            params = event_log.params[i]
            if t is None:
                continue
            key = (fp, params)
            if key in cache:
                costs[j] = cache[key]
                continue
            cost = math.nan
            db = event_log.databases[event_log.database[i]]
            if time.monotonic() - started < budget_s and t.kind in ("select", "insert", "update", "delete"):
                conn = conns.get(db)
                if conn is None and db not in conns:
                    dsn = dsn_for_database(db)
                    try:
                        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5) if dsn else None
                        if conn is not None:
                            conn.execute(f"SET statement_timeout = {int(timeout_ms)}")
                    except psycopg.Error as e:
                        log.warning("cannot EXPLAIN on %s: %s", db, e)
                        conn = None
                    conns[db] = conn
                if conn is not None:
                    cost = _explain_one(conn, t.normalized_sql, params, t.sample_sql)
            if math.isnan(cost) and fp in event_log.plans:
                cost = float(event_log.plans[fp]["plan_cost"])
            cache[key] = cost
            costs[j] = cost
    finally:
        for conn in conns.values():
            if conn is not None:
                conn.close()
    return costs


def _explain_one(conn, sql: str, params, sample_sql: str | None) -> float:
    from psycopg import pq

    pg = conn.pgconn
    attempts = []
    if params is not None:
        attempts.append((sql, [None if p is None else p.encode() for p in params]))
    elif "$" not in sql:
        attempts.append((sql, []))
    elif sample_sql:
        attempts.append((sample_sql, []))
    for text, values in attempts:
        res = pg.exec_params(("EXPLAIN (FORMAT JSON) " + text).encode(), values)
        if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples:
            plan = json.loads(res.get_value(0, 0))
            return float(plan[0]["Plan"]["Total Cost"])
    return math.nan


def cost_baseline(cost_train: np.ndarray, y_train: np.ndarray, cost_test: np.ndarray) -> tuple[np.ndarray, dict]:
    """Fit ln(time) = a + b ln(cost) on training rows with a cost; predict ln(time) for test rows (NaN: no cost)."""
    ok = np.isfinite(cost_train)
    pred = np.full(len(cost_test), np.nan)
    if ok.sum() < 10:
        return pred, {"fitted": False}
    A = np.stack([np.ones(ok.sum()), np.log1p(cost_train[ok])], axis=1)
    coef, *_ = np.linalg.lstsq(A, y_train[ok], rcond=None)
    has = np.isfinite(cost_test)
    pred[has] = coef[0] + coef[1] * np.log1p(cost_test[has])
    return pred, {"fitted": True, "intercept": float(coef[0]), "slope": float(coef[1]), "train_rows": int(ok.sum())}


# ---------------------------------------------------------------------------------------------
# Model families and the search

def make_model(family: str, params: dict, seed: int):
    if family == "xgboost":
        import xgboost as xgb
        # one thread: on a shared machine OpenMP threads that wait on each other cost more than they give
        return xgb.XGBRegressor(tree_method="hist", max_bin=64, n_jobs=1, random_state=seed, **params)
    if family == "random_forest":
        from sklearn.ensemble import RandomForestRegressor
        return RandomForestRegressor(n_jobs=1, random_state=seed, **params)
    if family == "gradient_boosting":
        from sklearn.ensemble import GradientBoostingRegressor
        return GradientBoostingRegressor(random_state=seed, **params)
    raise ValueError(f"unknown model family {family!r}")


def sample_params(family: str, rng: random.Random, first: bool) -> dict:
    """A random configuration of a family (its defaults first)."""
    if family == "xgboost":
        if first:
            return {"n_estimators": 200, "max_depth": 7, "learning_rate": 0.1, "min_child_weight": 3,
                    "subsample": 0.9, "colsample_bytree": 0.8}
        # absolute error on ln(time) aims at the median: the better choice when timings are noisy
        return {"n_estimators": rng.choice((150, 250, 400)), "max_depth": rng.choice((5, 6, 8)),
                "objective": rng.choice(("reg:squarederror", "reg:absoluteerror")),
                "learning_rate": math.exp(rng.uniform(math.log(0.03), math.log(0.25))),
                "min_child_weight": rng.choice((1, 3, 10)), "subsample": rng.uniform(0.7, 1.0),
                "colsample_bytree": rng.uniform(0.5, 1.0), "reg_lambda": rng.choice((1.0, 5.0))}
    if family == "random_forest":
        if first:
            return {"n_estimators": 60, "max_depth": 12, "min_samples_leaf": 5, "max_features": 0.5}
        return {"n_estimators": rng.choice((40, 60, 100)), "max_depth": rng.choice((8, 10, 12)),
                "min_samples_leaf": rng.choice((2, 5, 10)), "max_features": rng.choice((0.3, 0.5, 0.8))}
    if family == "gradient_boosting":
        if first:
            return {"n_estimators": 150, "max_depth": 5, "learning_rate": 0.1, "subsample": 0.8,
                    "max_features": 0.5}
        return {"n_estimators": rng.choice((100, 150, 250)), "max_depth": rng.choice((3, 4, 5, 6)),
                "loss": rng.choice(("squared_error", "huber", "absolute_error")),
                "learning_rate": math.exp(rng.uniform(math.log(0.05), math.log(0.25))),
                "subsample": rng.uniform(0.7, 1.0), "max_features": rng.choice((0.3, 0.5, 0.8))}
    raise ValueError(f"unknown model family {family!r}")


def _time_folds(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Expanding-window folds over time-ordered rows: train on the past, validate on the next block."""
    block = n // (folds + 1)
    out = []
    for k in range(1, folds + 1):
        out.append((np.arange(0, k * block), np.arange(k * block, min(n, (k + 1) * block))))
    return out


@dataclass
class SearchResult:
    family: str
    params: dict
    cv_p90: float
    trials: list = field(default_factory=list)


def search(X: np.ndarray, y: np.ndarray, *, budget_s: float, folds: int, families=FAMILIES, seed: int = 0
           ) -> SearchResult:
    """Random search per family within budget_s (shared equally), scored by the mean validation p90 q-error.

    Each family gets its default configuration, then random ones while the next is expected (from the last
    one's duration) to finish within the family's share of the budget.
    """
    rng = random.Random(seed)
    trials = []
    best: SearchResult | None = None
    per_family = budget_s / max(1, len(families))
    for family in families:
        started = time.monotonic()
        first = True
        last_trial = 0.0
        rows = spread(len(X), SEARCH_ROWS)
        Xs, ys = X[rows], y[rows]
        while first or time.monotonic() - started + last_trial <= per_family:
            params = sample_params(family, rng, first)
            first = False
            t0 = time.monotonic()
            scores = []
            for tr, va in _time_folds(len(Xs), folds):
                if len(tr) < 20 or len(va) < 5:
                    continue
                model = make_model(family, params, seed)
                model.fit(Xs[tr], ys[tr])
                q = qerror(to_us(model.predict(Xs[va])), np.exp(ys[va]))
                scores.append(float(np.percentile(q, 90)))
            score = float(np.mean(scores)) if scores else float("inf")
            last_trial = time.monotonic() - t0
            trials.append({"family": family, "params": params, "cv_p90": score, "seconds": last_trial})
            log.info("time model search: %s %s -> CV p90 q-error %.3f (%.1fs)", family,
                     {k: (round(v, 3) if isinstance(v, float) else v) for k, v in params.items()}, score,
                     time.monotonic() - t0)
            if best is None or score < best.cv_p90:
                best = SearchResult(family, params, score)
    best.trials = trials
    return best


# ---------------------------------------------------------------------------------------------
# Explanations

def explain_rows(model, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(contributions (n, features), bias (n,)) such that bias + contributions.sum(1) == prediction (ln us)."""
    X = np.asarray(X, dtype=np.float32)
    if type(model).__module__.startswith("xgboost"):
        import xgboost as xgb
        contrib = model.get_booster().predict(xgb.DMatrix(X), pred_contribs=True)
        return contrib[:, :-1], contrib[:, -1]
    if hasattr(model, "estimators_") and type(model).__name__.startswith("RandomForest"):
        parts = [_tree_contributions(est.tree_, X) for est in model.estimators_]
        contrib = np.mean([p[0] for p in parts], axis=0)
        bias = np.mean([p[1] for p in parts], axis=0)
        return contrib, bias
    if type(model).__name__.startswith("GradientBoosting"):
        contrib = np.zeros(X.shape, dtype=np.float64)
        bias = np.full(len(X), float(np.ravel(model._raw_predict_init(X[:1]))[0]))
        for est in model.estimators_[:, 0]:
            c, b = _tree_contributions(est.tree_, X)
            contrib += model.learning_rate * c
            bias += model.learning_rate * b
        return contrib, bias
    raise TypeError(f"no explanation for {type(model).__name__}")


def _tree_contributions(tree, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Path decomposition of one regression tree: each split's change in node value goes to its feature."""
    values = tree.value[:, 0, 0]
    contrib = np.zeros(X.shape, dtype=np.float64)
    node = np.zeros(len(X), dtype=np.int64)
    rows = np.arange(len(X))
    left, right, feature, threshold = tree.children_left, tree.children_right, tree.feature, tree.threshold
    active = left[node] != -1
    while active.any():
        r = rows[active]
        nd = node[r]
        f = feature[nd]
        go_left = X[r, f] <= threshold[nd]
        child = np.where(go_left, left[nd], right[nd])
        np.add.at(contrib, (r, f), values[child] - values[nd])
        node[r] = child
        active = left[node] != -1
    return contrib, np.full(len(X), values[0])


def explain_prediction(model, x: np.ndarray, top: int = 6) -> dict:
    """One prediction as microseconds plus its largest feature contributions (as factors on the time)."""
    contrib, bias = explain_rows(model, np.asarray(x).reshape(1, -1))
    names = FEATURE_NAMES[KIND]
    order = np.argsort(-np.abs(contrib[0]))[:top]
    return {"predicted_us": float(np.exp(bias[0] + contrib[0].sum())), "base_us": float(np.exp(bias[0])),
            "factors": [{"feature": names[k], "value": float(x[k]), "factor": float(np.exp(contrib[0, k]))}
                        for k in order]}


# ---------------------------------------------------------------------------------------------

@dataclass
class TimeModelResult:
    model: object
    family: str
    params: dict
    metrics: dict
    search: SearchResult
    data: TimeData
    predictions_us: np.ndarray


def train_and_evaluate(data: TimeData, *, budget_s: float, folds: int, families=FAMILIES, seed: int = 0,
                       cost_train: np.ndarray | None = None, cost_test: np.ndarray | None = None) -> TimeModelResult:
    """Search, refit the winner on the training rows, and evaluate it and the baselines on the held-out rows."""
    best = search(data.X_train, data.y_train, budget_s=budget_s, folds=folds, families=families, seed=seed)
    rows = spread(len(data.X_train), FINAL_ROWS[best.family])
    n = len(rows)
    model = make_model(best.family, best.params, seed)
    t0 = time.monotonic()
    model.fit(data.X_train[rows], data.y_train[rows])
    fit_s = time.monotonic() - t0
    pred_us = to_us(model.predict(data.X_test))
    true_us = np.exp(data.y_test)
    q_model = qerror(pred_us, true_us)
    q_mean = qerror(data.mean_baseline_us, true_us)
    metrics = {
        "family": best.family, "params": best.params, "cv_p90": best.cv_p90, "fit_seconds": fit_s,
        "search": [{"family": t["family"], "cv_p90": t["cv_p90"], "seconds": t["seconds"]} for t in best.trials],
        "train_rows": int(n), "test_rows": int(len(true_us)),
        "time_split": {"model": qerror_summary(q_model), "template_mean": qerror_summary(q_mean)},
        "unseen_parameters": {"model": qerror_summary(q_model[data.unseen_params]),
                              "template_mean": qerror_summary(q_mean[data.unseen_params])},
    }
    if cost_train is not None and cost_test is not None:
        # cost arrays align with the training / test rows, NaN where no estimate was obtained
        pred_cost_ln, fit = cost_baseline(cost_train, data.y_train, cost_test)
        has = np.isfinite(pred_cost_ln)
        metrics["cost_baseline"] = {
            "fit": fit, "rows_with_cost": int(has.sum()),
            "model": qerror_summary(q_model[has]), "template_mean": qerror_summary(q_mean[has]),
            "postgres_cost": qerror_summary(qerror(np.exp(pred_cost_ln[has]), true_us[has]))}
    # Irreducible noise: the same statement with the same parameters, predicted by its own median time.
    metrics["repeat_noise"] = qerror_summary(_repeat_noise(data, true_us))
    return TimeModelResult(model, best.family, best.params, metrics, best, data, pred_us)


def _repeat_noise(data: TimeData, true_us: np.ndarray) -> np.ndarray:
    groups: dict[tuple, list[int]] = {}
    for j, g in enumerate(data.test_groups):
        if g is not None:
            groups.setdefault(g, []).append(j)
    out = []
    for members in groups.values():
        if len(members) >= 3:
            med = np.median(true_us[members])
            out.extend(qerror(np.full(len(members), med), true_us[members]).tolist())
    return np.array(out)
