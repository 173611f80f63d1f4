"""Workload classes: KMeans and DBSCAN over scaled template features, chosen by silhouette, with cluster profiles.

KMeans tries k = 2..8 and keeps the best silhouette; DBSCAN tries eps at quantiles of the k-nearest-neighbour
distances. The better of the two (silhouette over clustered templates, times the share clustered) is served.
New templates are assigned by the served model: KMeans' own predict, or for DBSCAN the nearest core point (a
1-nearest-neighbour classifier fit on the core points), both as a scaler + model pipeline exported to ONNX.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from learning.logdata import EventLog
from proxy.features import FEATURE_NAMES, transform_many

log = logging.getLogger("pgpilot.learn")

KIND = "cluster"


@dataclass
class ClusterResult:
    algorithm: str                 # kmeans | dbscan
    model: object                  # a fitted Pipeline(StandardScaler, KMeans | KNeighborsClassifier)
    labels: np.ndarray             # per template row
    silhouette: float
    k: int
    candidates: list
    fingerprints: list[str]
    profiles: list


def template_matrix(event_log: EventLog, stats: dict) -> tuple[np.ndarray, list[str]]:
    """Cluster feature rows of every template with statistics."""
    rows, fps = [], []
    for fp, t in stats.items():
        tp = event_log.templates.get(fp)
        rows.append({"sql": tp.normalized_sql if tp else "", "template": t})
        fps.append(fp)
    X = transform_many(rows, KIND) if rows else np.zeros((0, len(FEATURE_NAMES[KIND])), np.float32)
    return X, fps


def _silhouette(Z: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score
    ok = labels >= 0
    if ok.sum() < 3 or len(np.unique(labels[ok])) < 2 or len(np.unique(labels[ok])) >= ok.sum():
        return -1.0
    return float(silhouette_score(Z[ok], labels[ok]))


def fit_clusters(X: np.ndarray, fingerprints: list[str], seed: int = 0, max_k: int = 8) -> ClusterResult | None:
    """The better of KMeans (k by silhouette) and DBSCAN (eps by silhouette), or None with < 4 templates."""
    from sklearn.cluster import DBSCAN, KMeans
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(X) < 4:
        return None
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    candidates = []
    best_km = None
    for k in range(2, min(max_k, len(X) - 1) + 1):
        km = KMeans(n_clusters=k, n_init=5, random_state=seed).fit(Z)
        s = _silhouette(Z, km.labels_)
        candidates.append({"algorithm": "kmeans", "k": k, "silhouette": s})
        if best_km is None or s > best_km[0]:
            best_km = (s, k)
    min_samples = 3 if len(X) >= 10 else 2
    dist = NearestNeighbors(n_neighbors=min_samples).fit(Z).kneighbors(Z)[0][:, -1]
    best_db = None
    for q in (50, 60, 70, 80, 90):
        eps = float(np.percentile(dist, q))
        if eps <= 0:
            continue
        db = DBSCAN(eps=eps, min_samples=min_samples).fit(Z)
        labels = db.labels_
        clustered = float((labels >= 0).mean())
        s = _silhouette(Z, labels)
        score = s * clustered if s > -1 else -1.0
        candidates.append({"algorithm": "dbscan", "eps": eps, "silhouette": s, "clustered": clustered,
                           "score": score, "clusters": int(len(set(labels) - {-1}))})
        if len(db.core_sample_indices_) >= 2 and (best_db is None or score > best_db[0]):
            best_db = (score, eps, s)
    use_dbscan = best_db is not None and best_db[0] > best_km[0]
    if use_dbscan:
        db = DBSCAN(eps=best_db[1], min_samples=min_samples).fit(Z)
        core = db.core_sample_indices_
        model = make_pipeline(StandardScaler().fit(X), KNeighborsClassifier(n_neighbors=1))
        model.fit(X[core], db.labels_[core])
        labels = model.predict(X)  # every template, noise included, gets its nearest core point's cluster
        algorithm, silhouette, k = "dbscan", best_db[2], int(len(set(db.labels_[core])))
    else:
        model = make_pipeline(StandardScaler(), KMeans(n_clusters=best_km[1], n_init=5, random_state=seed))
        model.fit(X)
        labels = model.predict(X)
        algorithm, silhouette, k = "kmeans", best_km[0], best_km[1]
    return ClusterResult(algorithm, model, np.asarray(labels), silhouette, k, candidates, fingerprints, [])


def profiles(result: ClusterResult, stats: dict, event_log: EventLog, report_templates: dict | None = None) -> list:
    """What each cluster is: its templates' share of calls and DB time, typical latency, rows and classes."""
    total_calls = sum(t.calls for t in stats.values()) or 1
    total_time = sum(t.calls * t.mean_us for t in stats.values()) or 1.0
    out = []
    for c in sorted(set(result.labels.tolist())):
        members = [fp for fp, lab in zip(result.fingerprints, result.labels) if lab == c]
        ts = [stats[fp] for fp in members]
        calls = sum(t.calls for t in ts)
        time_us = sum(t.calls * t.mean_us for t in ts)
        kinds: dict[str, int] = {}
        for fp in members:
            tp = event_log.templates.get(fp)
            kinds[tp.kind if tp else "other"] = kinds.get(tp.kind if tp else "other", 0) + 1
        classes: dict[str, int] = {}
        for fp in members:
            r = (report_templates or {}).get(fp)
            if r:
                key = f"{r['workload_class']}/{r['weight_class']}"
                classes[key] = classes.get(key, 0) + 1
        example = max(members, key=lambda fp: stats[fp].calls)
        tp = event_log.templates.get(example)
        out.append({
            "cluster": int(c), "templates": len(members), "call_share": calls / total_calls,
            "time_share": time_us / total_time,
            "p50_ms_median": float(np.median([t.p50_us for t in ts])) / 1000.0,
            "calls_per_hour": float(sum(t.calls_per_hour for t in ts)),
            "rows_p50_median": float(np.median([t.rows_p50 for t in ts])), "kinds": kinds, "classes": classes,
            "example": " ".join((tp.normalized_sql if tp else example).split())[:120],
        })
    return out


def labels_silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette of given cluster labels on template rows (scaled), for comparing champions on the same data."""
    from sklearn.preprocessing import StandardScaler
    if len(X) < 4:
        return -1.0
    return _silhouette(StandardScaler().fit_transform(X), np.asarray(labels).astype(int))
