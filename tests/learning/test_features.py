"""proxy.features: the one feature extraction shared by training and serving."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from proxy import features as f


def names(values) -> dict:
    return {n: v for n, v in zip(f.STATEMENT_FEATURES, values) if v}


def test_normalize_replaces_constants_by_numbered_parameters_and_returns_their_values():
    sql, values = f.normalize("SELECT * FROM t WHERE a = $1 AND b = 'it''s' AND c > 2.5 LIMIT 10")
    assert sql == "SELECT * FROM t WHERE a = $1 AND b = $2 AND c > $3 LIMIT $4"
    assert values == ("it's", "2.5", "10")


def test_a_raw_statement_and_its_normalized_form_have_the_same_features():
    raw = "SELECT id, name FROM customers WHERE email = '' OR 'a'='a' ORDER BY id LIMIT 5"
    normalized, _ = f.normalize(raw)
    assert f.statement_features(raw) == f.statement_features(normalized)
    # the proxy's normalizer writes `$n` too; the shape does not depend on which one wrote it
    assert f.statement_features("SELECT id, name FROM customers WHERE email = $1 OR $2 = $3 ORDER BY id LIMIT $4") \
        == f.statement_features(raw)


def test_statement_shape_counts_tables_joins_aggregates_and_clauses():
    v = names(f.statement_features(
        "SELECT c.country, count(*) FROM orders o JOIN customers c ON c.id = o.customer_id "
        "WHERE o.amount > 10 GROUP BY 1 ORDER BY 2 DESC LIMIT 5"))
    assert v["stmt_is_select"] == 1 and v["stmt_tables"] == 2 and v["stmt_joins"] == 1
    assert v["stmt_aggregates"] == 1 and v["stmt_group_by"] == 1 and v["stmt_order_by"] == 1 and v["stmt_limit"] == 1


def test_injection_shapes_are_visible_in_the_statement_features():
    assert names(f.statement_features("SELECT * FROM users WHERE id = 1 OR 1=1"))["inj_const_comparisons"] == 1
    assert names(f.statement_features("SELECT a, b FROM t WHERE id = -1 UNION SELECT NULL, NULL"))[
        "inj_union_nulls"] == 2
    assert names(f.statement_features("SELECT 1; DROP TABLE users"))["inj_statements"] == 2
    assert names(f.statement_features("SELECT pg_sleep(5)"))["inj_suspicious_funcs"] == 1
    assert names(f.statement_features("SELECT usename FROM pg_catalog.pg_user"))["inj_catalog"] == 1
    assert names(f.statement_features("SELECT * FROM t WHERE name = 'a' -- '"))["inj_comments"] == 1
    plain = names(f.statement_features("SELECT * FROM users WHERE id = 1"))
    assert not any(k.startswith("inj_") and k != "inj_statements" for k in plain)


def test_parameters_become_numbers_dates_become_days_and_ranges_become_differences():
    v = dict(zip(f.PARAM_FEATURES, f.param_features(("2024-01-01", "2024-01-31", "10"))))
    assert v["par_present"] == 1 and v["par_count"] == 3
    assert np.isclose(np.expm1(v["par_d01"]), 30.0)          # a 30-day range
    assert np.isclose(np.expm1(v["par_v2"]), 10.0)
    odd = dict(zip(f.PARAM_FEATURES, f.param_features(("x' OR 'a'='a",))))
    assert odd["par_tautology"] == 1 and odd["par_quotes"] >= 1


def test_transform_one_gives_the_rows_that_transform_many_stacks():
    t = f.TemplateStats(calls=100, calls_per_hour=50.0, mean_us=300.0, p50_us=250.0, p95_us=900.0, mad_log_us=0.3,
                        rows_p50=1.0, bytes_p50=60.0, error_rate=0.0, app_share={"web": 1.0})
    events = [{"sql": "SELECT * FROM t WHERE id = $1", "parameters": [str(i)], "ts": 1.7e9 + i, "template": t,
               "duration_us": 200.0 + i, "rows": 1, "bytes_out": 60, "application_name": "web"} for i in range(5)]
    for kind in f.FEATURE_NAMES:
        stacked = f.transform_many(events, kind)
        assert stacked.shape == (5, len(f.FEATURE_NAMES[kind]))
        for i, e in enumerate(events):
            assert np.array_equal(f.transform_one(e, kind), stacked[i])


def test_a_serving_context_read_back_from_json_builds_identical_rows():
    t = f.TemplateStats(calls=100, calls_per_hour=50.0, mean_us=300.0, p50_us=250.0, p95_us=900.0,
                        mad_log_us=0.3, rows_p50=1.0, bytes_p50=60.0, error_rate=0.0, app_share={"web": 1.0})
    ctx = f.ServingContext({"fp1": t}, apps={"web"}, clients={"10.0.0.1"})
    again = f.ServingContext.from_json(ctx.to_json())
    event = {"sql": "SELECT 1", "fingerprint": "fp1", "ts": 1.7e9, "duration_us": 5000.0,
             "application_name": "web", "client_addr": "10.0.0.1"}
    assert np.array_equal(f.transform_one(ctx.prepare(event), "anomaly"), f.transform_one(again.prepare(event),
                                                                                         "anomaly"))


def test_a_template_with_few_calls_from_unknown_senders_is_not_known_history():
    rare = f.TemplateStats(calls=5, p50_us=100.0, app_share={"psql": 1.0})
    usual = f.TemplateStats(calls=500, p50_us=100.0, app_share={"web": 1.0})
    ctx = f.ServingContext({"rare": rare, "usual": usual}, apps={"web"})
    assert ctx.prepare({"fingerprint": "rare"})["template"] is None
    assert ctx.prepare({"fingerprint": "usual"})["template"] is usual


def test_the_error_window_counts_a_senders_errors_in_the_last_ten_seconds():
    window = f.RecentErrors(10.0)
    assert [window.observe("c", t, True) for t in (0.0, 1.0, 2.0)] == [1, 2, 3]
    assert window.observe("c", 11.5, False) == 1      # the errors at 0 and 1 s have left the window
    assert window.observe("other", 11.5, True) == 1


def test_the_proxy_side_modules_do_not_import_scikit_learn_or_xgboost():
    code = ("import sys, proxy.features, proxy.models; "
            "bad = [m for m in ('sklearn', 'xgboost', 'pandas') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_line_comment_that_cuts_off_an_injected_statement_stays_visible_in_the_logged_text():
    from proxy.analysis import analyze
    from proxy.features import STATEMENT_FEATURES, statement_features
    comments = STATEMENT_FEATURES.index("inj_comments")
    cut = analyze("SELECT id, name FROM customers WHERE name = 'admin'--'")
    plain = analyze("SELECT id, name FROM customers WHERE name = 'bob'")
    tagged = analyze("SELECT id, name FROM customers WHERE name = 'bob' /* controller='users' */")
    assert cut.fingerprint == plain.fingerprint == tagged.fingerprint
    assert statement_features(cut.normalized)[comments] == 1
    # a block comment (sqlcommenter, marginalia) leaves nothing
    assert statement_features(plain.normalized)[comments] == statement_features(tagged.normalized)[comments] == 0
