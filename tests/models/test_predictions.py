"""Predicted execution time per template from the time model's champion, shown beside the measured times in
SHOW QUERIES."""
from __future__ import annotations

import math

import psycopg
import pytest

from tests.models.conftest import wait_for
from tests.ops.helpers import admin_rows, metric_samples

SLOW = "SELECT count(*) FROM pred_big WHERE v > 3"
FAST = "SELECT v FROM pred_small WHERE id = 1"
SLOW_MS, FAST_MS = 40.0, 0.25


def time_champion(model_dir) -> str:
    """A time model (a regression tree on ln(us), exported and registered as the learner does) that has learned
    SLOW takes 40 ms and FAST 0.25 ms, with a serving context holding both templates' history."""
    import time

    from sklearn.tree import DecisionTreeRegressor

    from learning.export import export_onnx
    from learning.registry import Registry
    from proxy.analysis import analyze
    from proxy.features import ServingContext, TemplateStats, transform_many
    stats = {analyze(sql).fingerprint: TemplateStats(calls=1000, p50_us=ms * 1000, mean_us=ms * 1000,
                                                     app_share={"app": 1.0})
             for sql, ms in ((SLOW, SLOW_MS), (FAST, FAST_MS))}
    context = ServingContext(stats, apps={"app"})
    rows = [{"sql": analyze(sql).normalized, "ts": time.time(), "template": stats[analyze(sql).fingerprint]}
            for sql in (SLOW, FAST)]
    model = DecisionTreeRegressor(random_state=0).fit(transform_many(rows, "time"),
                                                      [math.log(SLOW_MS * 1000), math.log(FAST_MS * 1000)])
    registry = Registry(model_dir)
    sha = registry.add(export_onnx(model, "time", algorithm="decision-tree", metrics={}, training_window={}),
                       {"kind": "time"}, context.to_json())
    assert registry.promote("time", sha, metric="qerror_p90", score=1.0, champion_score=None,
                            higher_is_better=False)[0]
    return sha


@pytest.fixture
def predicting_proxy(pg, fresh_db, proxy_factory, tmp_path):
    pg.psql("CREATE TABLE pred_big AS SELECT i AS v FROM generate_series(1, 1000) i; "
            "CREATE TABLE pred_small (id int PRIMARY KEY, v int); INSERT INTO pred_small VALUES (1, 1)",
            dbname=fresh_db)
    time_champion(tmp_path)
    return proxy_factory(fresh_db, learning={"model_dir": str(tmp_path)}, models={"poll_interval": 0.2},
                         query_log={"enabled": True, "flush_interval": 0.1})


def test_show_queries_shows_the_predicted_time_beside_the_measured_one(fresh_db, predicting_proxy):
    proxy = predicting_proxy
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True, application_name="app") as conn:
        for _ in range(3):
            conn.execute(SLOW)
            conn.execute(FAST)

    def logged():
        rows = [r for r in admin_rows(proxy, "SHOW QUERIES 50") if "pred_" in r["query"] and r["calls"] == 3]
        return rows if len(rows) == 2 else None
    predicted = {("slow" if "pred_big" in r["query"] else "fast"): r["predicted_ms"]
                 for r in wait_for(logged, what="both templates in SHOW QUERIES")}
    assert predicted["slow"] == pytest.approx(SLOW_MS, rel=1e-3)
    assert predicted["fast"] == pytest.approx(FAST_MS, rel=1e-3)
    assert metric_samples(proxy)[("pgpilot_time_predictions", ())] >= 2


def test_without_a_time_model_the_prediction_is_empty(fresh_db, proxy_factory, tmp_path):
    proxy = proxy_factory(fresh_db, learning={"model_dir": str(tmp_path)}, query_log={"enabled": True,
                                                                                       "flush_interval": 0.1})
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("SELECT 42")
    rows = wait_for(lambda: admin_rows(proxy, "SHOW QUERIES"), what="a template in SHOW QUERIES")
    assert rows[0]["predicted_ms"] is None and "mean_ms" in rows[0]
