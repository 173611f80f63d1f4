"""The anomaly detector on the labelled anomalies injected into the simulated log."""
from __future__ import annotations

import numpy as np
import pytest

from learning import anomaly as an
from learning.logdata import time_split
from proxy.features import ANOMALY_CLASSES, FEATURE_NAMES, anomaly_reasons


@pytest.fixture(scope="module")
def evaluated(event_log, labels):
    train, test = time_split(event_log, 0.3)
    data = an.build_dataset(event_log, train, test, labels, max_train_rows=12_000)
    return an.train_and_evaluate(data, threshold=0.5, augment_per_class=1500)


def test_precision_and_recall_on_the_injected_anomalies_are_at_least_90_percent(evaluated):
    m = evaluated.metrics
    assert m["labelled"] > 100
    assert m["student"]["precision"] >= 0.9, m["student"]
    assert m["student"]["recall"] >= 0.9, m["student"]


def test_every_injected_class_is_detected_and_mostly_given_its_own_reason(evaluated):
    per_class = evaluated.metrics["per_class"]
    assert set(per_class) == set(ANOMALY_CLASSES)
    for cls, r in per_class.items():
        assert r["recall"] >= 0.6, (cls, r)
    assert per_class["slow_outlier"]["reason_matches"] >= 0.9
    assert per_class["injection"]["reason_matches"] >= 0.9


def test_the_distilled_model_agrees_with_the_rules_it_learned_from(evaluated):
    d = evaluated.metrics["distillation"]
    assert d["decision_agreement"] >= 0.995
    assert d["mean_abs_diff"] < 0.02


def test_the_isolation_forest_alone_does_worse_than_the_distilled_detector(evaluated):
    m = evaluated.metrics
    assert m["isolation_forest"]["auto_threshold"]["f1"] < m["student"]["f1"]
    assert m["isolation_forest"]["best_threshold_with_labels"]["f1"] < m["student"]["f1"]


def test_rules_name_the_reason_of_a_flag():
    names = FEATURE_NAMES["anomaly"]
    row = np.zeros((1, len(names)), dtype=np.float32)
    i = {n: k for k, n in enumerate(names)}
    row[0, i["hist_known"]] = 1
    row[0, i["ev_app_known"]] = row[0, i["ev_client_known"]] = 1
    row[0, i["ev_app_template_share"]] = 1
    row[0, i["inj_const_comparisons"]] = 1
    score, reason = anomaly_reasons(row)
    assert score[0] >= 1.0 and ANOMALY_CLASSES[reason[0]] == "injection"
    row[0, i["inj_const_comparisons"]] = 0
    row[0, i["ev_error"]] = 1
    row[0, i["ev_client_recent_errors"]] = 6
    score, reason = anomaly_reasons(row)
    assert score[0] >= 1.0 and ANOMALY_CLASSES[reason[0]] == "error_burst"
    row[0, i["ev_error"]] = 0
    assert anomaly_reasons(row)[0][0] == 0.0


def test_a_slow_outlier_is_judged_against_what_its_parameters_make_expected():
    from learning.logdata import _robust_ridge
    from proxy.features import TemplateStats, fit_basis, param_features, transform_many
    rng = np.random.default_rng(0)
    # a template whose time grows with its parameter (a customer's history): 0.05 ms to 80 ms
    keys = rng.integers(1, 10_000, 400)
    dur = 50.0 * keys ** 0.8 * np.exp(rng.normal(0.0, 0.1, len(keys)))
    basis = np.array([fit_basis(1, 60, param_features((str(k),))) for k in keys])
    t = TemplateStats(calls=400, p50_us=float(np.median(dur)), p95_us=float(np.percentile(dur, 95)),
                      mad_log_us=float(np.median(np.abs(np.log1p(dur) - np.median(np.log1p(dur))))), rows_p50=1,
                      bytes_p50=60, error_rate=0.0, n_apps=1, app_share={"web": 1.0},
                      time_fit=_robust_ridge(basis, np.log1p(dur)), time_fit_rows=_robust_ridge(basis[:, :3],
                                                                                              np.log1p(dur)))

    def row(key: int, us: float):
        return transform_many([{"sql": "SELECT * FROM orders WHERE customer_id = $1", "parameters": (str(key),),
                                "template": t, "duration_us": us, "rows": 1, "bytes_out": 60,
                                "application_name": "web", "app_known": True, "client_known": True}], "anomaly")

    slow = ANOMALY_CLASSES.index("slow_outlier")
    heavy_us = 50.0 * 9000 ** 0.8
    # the heaviest customer's usual time is no anomaly; the same time for a light customer is, though it stays
    # within the template's own p95 (which no rule against the template alone could tell apart)
    assert heavy_us < 2 * t.p95_us
    assert an.anomaly_signals(row(9000, heavy_us))[0, slow] == 0.0
    assert an.anomaly_signals(row(10, heavy_us))[0, slow] >= 1.0


def test_parameter_values_with_their_own_history_are_expected_to_take_their_usual_time():
    from proxy.features import TemplateStats, param_features, parameter_key, transform_many
    fit = [5.0, 0.0, 0.0, 4.0, 7.0, 0.2]   # ln(1 + us) = 5 whatever the statement: ~150 us
    hot = parameter_key(param_features(("7",)))
    t = TemplateStats(calls=1000, p50_us=150.0, p95_us=300.0, mad_log_us=0.2, rows_p50=1, bytes_p50=60,
                      error_rate=0.0, n_apps=1, app_share={"web": 1.0}, time_fit_rows=fit,
                      key_times={hot: float(np.log1p(4000.0))})   # customer 7 usually takes 4 ms

    def row(customer: str):
        return transform_many([{"sql": "SELECT count(*) FROM orders WHERE customer_id = $1", "parameters": (customer,),
                                "template": t, "duration_us": 4500.0, "rows": 1, "bytes_out": 60,
                                "application_name": "web", "app_known": True, "client_known": True}], "anomaly")

    slow = ANOMALY_CLASSES.index("slow_outlier")
    assert an.anomaly_signals(row("7"))[0, slow] == 0.0
    assert an.anomaly_signals(row("8"))[0, slow] >= 0.6


def test_the_learner_keeps_the_usual_time_of_parameter_values_its_fit_misses(event_log):
    from learning.logdata import serving_context, time_split
    from proxy.features import expected_time, param_features, parameter_key
    train, _ = time_split(event_log, 0.25)
    ctx = serving_context(event_log, train)
    keyed = {fp: t for fp, t in ctx.templates.items() if t.key_times}
    assert keyed   # the simulated customers' order counts are not log-linear in their ids
    tid = {fp: i for i, fp in enumerate(event_log.fingerprints)}
    checked = 0
    for fp, t in keyed.items():
        for i in np.nonzero(train & (event_log.template == tid[fp]))[0]:
            params = event_log.params[i]
            if params is None:
                continue
            pf = param_features(tuple(params))
            own = t.key_times.get(parameter_key(pf))
            if own is not None:
                assert expected_time(t, event_log.rows[i], event_log.bytes_out[i], pf)[0] == own
                checked += 1
    assert checked >= 3
