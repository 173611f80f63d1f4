"""Learned cache admission: the cache model's champion decides per template whether its results are stored."""
from __future__ import annotations

import psycopg
import pytest

from tests.models.conftest import wait_for
from tests.ops.helpers import admin_rows, metric_samples

HOT = "SELECT v FROM adm_hot WHERE id = 1"      # read often, its table rarely written: caching pays
COLD = "SELECT v FROM adm_cold WHERE id = 1"    # read rarely, its table written all the time: it does not
REPEATS = 4


def cache_champion(model_dir, hot_sql: str, cold_sql: str) -> str:
    """A small cache model (a decision tree, exported and registered as the learner does) and its serving context,
    made so that it admits the hot template and declines the cold one."""
    from sklearn.tree import DecisionTreeClassifier

    from learning.export import export_onnx
    from learning.registry import Registry
    from proxy.analysis import analyze
    from proxy.features import ServingContext, TemplateStats, transform_many
    hot, cold = analyze(hot_sql), analyze(cold_sql)
    stats = {
        hot.fingerprint: TemplateStats(calls=20_000, calls_per_hour=5_000, mean_us=8_000, p50_us=8_000, p95_us=9_000,
                                       rows_p50=1, bytes_p50=40, write_rate=1, error_rate=0, n_apps=1),
        cold.fingerprint: TemplateStats(calls=30, calls_per_hour=8, mean_us=90, p50_us=90, p95_us=120, rows_p50=1,
                                        bytes_p50=40, write_rate=4_000, error_rate=0, n_apps=1),
    }
    X = transform_many([{"sql": s.normalized, "template": stats[s.fingerprint]} for s in (hot, cold)] * 10, "cache")
    model = DecisionTreeClassifier(random_state=0).fit(X, [1, 0] * 10)
    onnx_bytes = export_onnx(model, "cache", algorithm="decision-tree", metrics={}, training_window={},
                             extra={"admit_at": 0.5})
    registry = Registry(model_dir)
    sha = registry.add(onnx_bytes, {"kind": "cache"}, ServingContext(stats).to_json())
    assert registry.promote("cache", sha, metric="db_time_saved_s", score=1.0, champion_score=None,
                            higher_is_better=True)[0]
    return sha


def upstream_calls(pg, dbname: str, table: str) -> int:
    out = pg.psql("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                  f"WHERE d.datname = '{dbname}' AND query LIKE 'SELECT v FROM {table} %'", dbname=dbname)
    return int(out.strip())


@pytest.fixture
def caching_proxy(pg, fresh_db, proxy_factory, tmp_path):
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; "
            "CREATE TABLE adm_hot (id int PRIMARY KEY, v text); CREATE TABLE adm_cold (id int PRIMARY KEY, v text); "
            "INSERT INTO adm_hot VALUES (1, 'hot'); INSERT INTO adm_cold VALUES (1, 'cold')", dbname=fresh_db)
    sha = cache_champion(tmp_path, HOT, COLD)
    proxy = proxy_factory(fresh_db, learning={"model_dir": str(tmp_path)}, models={"poll_interval": 0.2},
                          cache={"enabled": True, "decode_interval": 0.005, "catalog_check_interval": 0.2})
    conn = psycopg.connect(proxy.dsn(fresh_db), autocommit=True)
    yield proxy, conn, sha
    conn.close()


def decided(proxy, conn) -> dict:
    """Offer both templates to the cache until the model has decided on each (the cache serves once its feed is live)."""
    conn.pgconn.exec_(HOT.encode())
    conn.pgconn.exec_(COLD.encode())
    return {r["query"]: r for r in admin_rows(proxy, "SHOW ADMISSION")}


def test_the_cache_model_decides_admission_per_template(caching_proxy):
    proxy, conn, sha = caching_proxy
    assert next(r for r in admin_rows(proxy, "SHOW MODELS") if r["kind"] == "cache")["sha256"] == sha[:12]
    rows = wait_for(lambda: len(decided(proxy, conn)) == 2 and decided(proxy, conn), what="both templates decided")
    by_table = {("hot" if "adm_hot" in q else "cold"): r for q, r in rows.items()}
    assert by_table["hot"]["admit"] and by_table["hot"]["probability"] >= 0.5
    assert not by_table["cold"]["admit"] and by_table["cold"]["probability"] < 0.5


def test_a_declined_template_always_reaches_postgres_and_an_admitted_one_is_served_from_the_cache(
        pg, fresh_db, caching_proxy):
    proxy, conn, _ = caching_proxy
    wait_for(lambda: len(decided(proxy, conn)) == 2, what="both templates decided")
    # forget what the heuristic stored before the model had decided
    conn.execute("UPDATE adm_hot SET v = 'hot' WHERE id = 1")
    conn.execute("UPDATE adm_cold SET v = 'cold' WHERE id = 1")
    hot_before, cold_before = upstream_calls(pg, fresh_db, "adm_hot"), upstream_calls(pg, fresh_db, "adm_cold")
    for _ in range(REPEATS):
        assert conn.execute(HOT).fetchone() == ("hot",)
        assert conn.execute(COLD).fetchone() == ("cold",)
    assert upstream_calls(pg, fresh_db, "adm_cold") - cold_before == REPEATS
    assert upstream_calls(pg, fresh_db, "adm_hot") - hot_before <= 2   # a decoded write may invalidate it once more
    decisions = metric_samples(proxy)
    assert decisions[("pgpilot_admission_decisions_total", (("source", "model"), ("verdict", "decline")))] >= REPEATS
    assert decisions[("pgpilot_admission_decisions_total", (("source", "model"), ("verdict", "admit")))] >= 1


def test_one_decision_serves_every_literal_value_of_a_template(tmp_path):
    from proxy.analysis import Analyzer
    from proxy.cache.admission import HeuristicAdmission, TemplateStats
    from proxy.models import load_champion
    from proxy.served_models import LearnedAdmission
    cache_champion(tmp_path, HOT, COLD)
    admission = LearnedAdmission(HeuristicAdmission(), Analyzer())
    admission.use_model(load_champion(tmp_path, "cache"))
    assert admission.admit(TemplateStats(COLD)) is True          # the heuristic, until the model has decided
    assert admission.process() == 1
    for value in (1, 2, 77):
        assert admission.admit(TemplateStats(COLD.replace("= 1", f"= {value}"))) is False
        assert admission.admit(TemplateStats(HOT.replace("= 1", f"= {value}"))) is True
    assert admission.process() == 1                               # the hot template, once
    assert admission.decisions["model", False] == 3 and admission.decisions["heuristic", True] == 4
