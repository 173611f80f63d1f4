"""The query time predictor against its baselines, and its explanations."""
from __future__ import annotations

import numpy as np
import pytest

from learning import time_model as tm
from learning.logdata import time_split


@pytest.fixture(scope="module")
def trained(event_log, simulated_log):
    train, test = time_split(event_log, 0.25)
    data = tm.build_dataset(event_log, train, test, max_train_rows=8000, max_test_rows=3000)
    rng = np.random.default_rng(0)
    cost_train = np.full(len(data.X_train), np.nan)
    cost_test = np.full(len(data.X_test), np.nan)
    tr = rng.choice(len(data.X_train), 600, replace=False)
    te = rng.choice(len(data.X_test), 600, replace=False)
    dsn = lambda db: simulated_log.dsn  # noqa: E731 - every event ran on the simulated database
    cost_train[tr] = tm.explain_costs(event_log, data.train_index[tr], dsn)
    cost_test[te] = tm.explain_costs(event_log, data.test_index[te], dsn)
    return tm.train_and_evaluate(data, budget_s=6.0, folds=2, families=("xgboost", "random_forest"),
                                 cost_train=cost_train, cost_test=cost_test)


def test_the_predictor_beats_the_template_mean_and_the_postgres_cost_baselines(trained):
    m = trained.metrics
    assert m["time_split"]["model"]["p90"] < m["time_split"]["template_mean"]["p90"]
    assert m["time_split"]["model"]["median"] < m["time_split"]["template_mean"]["median"]
    cost = m["cost_baseline"]
    assert cost["rows_with_cost"] > 200   # statements whose text and parameters EXPLAIN accepts
    assert cost["model"]["p90"] < cost["postgres_cost"]["p90"]
    assert cost["model"]["p90"] < cost["template_mean"]["p90"]


def test_the_predictor_generalizes_to_parameter_values_never_seen_in_training(trained):
    unseen = trained.metrics["unseen_parameters"]
    assert unseen["model"]["n"] > 100
    assert unseen["model"]["p90"] < unseen["template_mean"]["p90"]


def test_an_explanation_adds_up_to_the_prediction(trained):
    x = trained.data.X_test[0]
    contrib, bias = tm.explain_rows(trained.model, x.reshape(1, -1))
    assert np.isclose(bias[0] + contrib[0].sum(), trained.model.predict(x.reshape(1, -1))[0], atol=1e-3)
    explained = tm.explain_prediction(trained.model, x)
    assert len(explained["factors"]) == 6 and explained["predicted_us"] > 0


def test_a_random_forest_is_explained_by_its_decision_paths():
    from sklearn.ensemble import RandomForestRegressor
    rng = np.random.default_rng(0)
    X = rng.random((300, 4)).astype(np.float32)
    y = 3 * X[:, 0] + X[:, 1]
    forest = RandomForestRegressor(n_estimators=10, max_depth=5, random_state=0).fit(X, y)
    contrib, bias = tm.explain_rows(forest, X[:20])
    assert np.allclose(bias + contrib.sum(axis=1), forest.predict(X[:20]), atol=1e-6)
    assert np.abs(contrib[:, 0]).mean() > np.abs(contrib[:, 3]).mean()   # the feature that matters most


def test_qerror_is_symmetric_and_one_for_a_perfect_guess():
    assert tm.qerror(np.array([100.0]), np.array([100.0]))[0] == 1.0
    assert tm.qerror(np.array([300.0]), np.array([100.0]))[0] == tm.qerror(np.array([100.0]), np.array([300.0]))[0]
