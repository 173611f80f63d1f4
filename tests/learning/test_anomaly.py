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
