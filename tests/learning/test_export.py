"""ONNX export: metadata for the loader, and the same answers as the native models."""
from __future__ import annotations

import numpy as np
import pytest

from learning.export import export_onnx, inference_cost_us, onnx_agreement
from proxy.features import FEATURE_NAMES, FEATURE_VERSION
from proxy.models import load_model

RNG = np.random.default_rng(0)


def data(kind: str, n: int = 400):
    X = RNG.normal(size=(n, len(FEATURE_NAMES[kind]))).astype(np.float32)
    y = X[:, 0] * 2 + np.sin(X[:, 1]) + RNG.normal(scale=0.1, size=n)
    return X, y


def regressors():
    import xgboost as xgb
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    return {"xgboost": xgb.XGBRegressor(n_estimators=40, max_depth=4),
            "random_forest": RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0),
            "gradient_boosting": GradientBoostingRegressor(n_estimators=40, max_depth=3, random_state=0)}


@pytest.mark.parametrize("family", ["xgboost", "random_forest", "gradient_boosting"])
def test_regressors_give_the_same_predictions_in_onnx(family):
    X, y = data("time")
    model = regressors()[family].fit(X, y)
    onnx_bytes = export_onnx(model, "time", algorithm=family, metrics={}, training_window={})
    agreement = onnx_agreement(onnx_bytes, model.predict(X), X)
    assert agreement["max_abs_diff"] < 1e-4, agreement


def test_a_classifier_exports_the_probability_of_the_positive_class():
    from sklearn.ensemble import GradientBoostingClassifier
    X, y = data("cache")
    model = GradientBoostingClassifier(n_estimators=30, random_state=0).fit(X, (y > 0).astype(int))
    onnx_bytes = export_onnx(model, "cache", algorithm="gbc", metrics={}, training_window={})
    assert onnx_agreement(onnx_bytes, model.predict_proba(X)[:, 1], X)["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("final", ["kmeans", "nearest_core_point"])
def test_cluster_assignment_is_the_same_in_onnx(final):
    from sklearn.cluster import KMeans
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, _ = data("cluster")
    if final == "kmeans":
        model = make_pipeline(StandardScaler(), KMeans(4, n_init=3, random_state=0)).fit(X)
    else:
        model = make_pipeline(StandardScaler(), KNeighborsClassifier(1)).fit(X[:50], np.arange(50) % 3)
    onnx_bytes = export_onnx(model, "cluster", algorithm=final, metrics={}, training_window={})
    assert onnx_agreement(onnx_bytes, model.predict(X).astype(float), X)["max_abs_diff"] == 0


def test_the_exported_file_carries_what_the_proxy_checks(tmp_path):
    X, y = data("anomaly")
    model = regressors()["xgboost"].fit(X, y)
    onnx_bytes = export_onnx(model, "anomaly", algorithm="xgboost", metrics={"f1": 0.97},
                             training_window={"from": "a", "to": "b"})
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_bytes)
    loaded = load_model(path, "anomaly")
    assert loaded.metadata["feature_version"] == FEATURE_VERSION
    assert tuple(loaded.metadata["feature_names"]) == FEATURE_NAMES["anomaly"]
    assert loaded.metadata["metrics"] == {"f1": 0.97}
    assert loaded.metadata["training_window"] == {"from": "a", "to": "b"}
    assert np.allclose(loaded.run(X[:10]), model.predict(X[:10]), atol=1e-4)


def test_inference_cost_is_measured_single_and_batched():
    X, y = data("anomaly", 300)
    model = regressors()["xgboost"].fit(X, y)
    cost = inference_cost_us(export_onnx(model, "anomaly", algorithm="xgboost", metrics={}, training_window={}),
                             X, batch=64, repeats=1)
    assert cost["single_us"] > 0 and cost["batched_us"] > 0 and cost["batch"] == 64
