"""The model registry: content addressing, champions, rollback, and refusal of corrupt or mismatched models."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from learning.export import export_onnx
from learning.registry import Registry, RegistryError
from proxy.features import FEATURE_NAMES, FEATURE_VERSION, ServingContext
from proxy.models import META_PREFIX, ModelRejected, load_champion


def model_bytes(seed: int, kind: str = "time") -> bytes:
    from sklearn.ensemble import RandomForestRegressor
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(100, len(FEATURE_NAMES[kind]))).astype(np.float32)
    model = RandomForestRegressor(n_estimators=3, max_depth=3, random_state=seed).fit(X, X[:, 0])
    return export_onnx(model, kind, algorithm="random_forest", metrics={}, training_window={})


def with_metadata(data: bytes, key: str, value) -> bytes:
    m = onnx.load_from_string(data)
    for prop in m.metadata_props:
        if prop.key == META_PREFIX + key:
            prop.value = json.dumps(value)
    return m.SerializeToString()


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "models")


def add(registry: Registry, data: bytes) -> str:
    return registry.add(data, {"kind": "time"}, ServingContext().to_json())


def test_models_are_stored_under_the_sha256_of_their_bytes(registry):
    import hashlib
    data = model_bytes(1)
    sha = add(registry, data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert registry.object_path(sha).read_bytes() == data
    assert registry.record(sha)["feature_version"] == FEATURE_VERSION


def test_the_first_model_becomes_champion_and_loads_with_its_context(registry):
    sha = add(registry, model_bytes(1))
    promoted, _ = registry.promote("time", sha, metric="qerror_p90", score=2.0, champion_score=None,
                                   higher_is_better=False)
    assert promoted
    champion = load_champion(registry.root, "time")
    assert champion.sha256 == sha and champion.context is not None


def test_a_model_becomes_champion_only_if_it_beats_the_champion_on_the_same_data(registry):
    first = add(registry, model_bytes(1))
    registry.promote("time", first, metric="qerror_p90", score=2.0, champion_score=None, higher_is_better=False)
    worse = add(registry, model_bytes(2))
    promoted, reason = registry.promote("time", worse, metric="qerror_p90", score=2.5, champion_score=2.1,
                                        higher_is_better=False)
    assert not promoted and "does not beat" in reason
    assert registry.champion("time")["sha256"] == first
    better = add(registry, model_bytes(3))
    promoted, _ = registry.promote("time", better, metric="qerror_p90", score=1.8, champion_score=2.1,
                                   higher_is_better=False)
    assert promoted and registry.champion("time")["sha256"] == better


def test_rollback_restores_the_previous_champion(registry):
    first, second = add(registry, model_bytes(1)), add(registry, model_bytes(2))
    registry.promote("time", first, metric="m", score=2.0, champion_score=None, higher_is_better=False)
    registry.promote("time", second, metric="m", score=1.0, champion_score=2.0, higher_is_better=False)
    pointer = registry.rollback("time")
    assert pointer["sha256"] == first and pointer["rolled_back_from"] == second
    assert load_champion(registry.root, "time").sha256 == first
    with pytest.raises(RegistryError):
        registry.rollback("time")       # nothing before the first champion


def test_a_corrupt_model_file_is_refused_and_the_champion_stays(registry):
    first, second = add(registry, model_bytes(1)), add(registry, model_bytes(2))
    registry.promote("time", first, metric="m", score=2.0, champion_score=None, higher_is_better=False)
    path = registry.object_path(second)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRejected, match="corrupt"):
        registry.promote("time", second, metric="m", score=1.0, champion_score=2.0, higher_is_better=False)
    assert registry.champion("time")["sha256"] == first


def test_rolling_back_to_a_corrupted_file_is_refused_and_the_champion_stays(registry):
    first, second = add(registry, model_bytes(1)), add(registry, model_bytes(2))
    registry.promote("time", first, metric="m", score=2.0, champion_score=None, higher_is_better=False)
    registry.promote("time", second, metric="m", score=1.0, champion_score=2.0, higher_is_better=False)
    registry.object_path(first).write_bytes(b"not a model")
    with pytest.raises(ModelRejected, match="refused"):
        registry.rollback("time")
    assert registry.champion("time")["sha256"] == second


def test_a_model_built_for_another_feature_version_is_refused(registry):
    stale = with_metadata(model_bytes(1), "feature_version", FEATURE_VERSION + 1)
    with pytest.raises(ModelRejected, match="FEATURE_VERSION"):
        add(registry, stale)
    assert not list((registry.root / "objects").glob("*.onnx"))


def test_a_model_whose_feature_names_differ_is_refused(registry):
    renamed = with_metadata(model_bytes(1), "feature_names", ["x"] * len(FEATURE_NAMES["time"]))
    with pytest.raises(ModelRejected, match="feature names"):
        add(registry, renamed)


def test_a_model_of_another_kind_is_refused(registry):
    with pytest.raises(ModelRejected, match="kind"):
        registry.add(model_bytes(1, "cache"), {"kind": "time"})
