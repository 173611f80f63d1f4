"""Export of trained models to ONNX (skl2onnx, onnxmltools for XGBoost) with pgpilot metadata, and agreement checks.

`export_onnx(model, kind, ...)` returns the model's ONNX bytes with metadata_props: kind, algorithm, version,
feature names, FEATURE_VERSION, training window, metrics, which output to read. proxy.models loads those bytes
with onnxruntime alone. `onnx_agreement(onnx_bytes, native_values, X)` reports how far ONNX and the native
model disagree on the same rows (tree ensembles run in float32 in both, so differences are rounding only).
"""
from __future__ import annotations

import datetime as dt
import json
import time

import numpy as np

from proxy.features import FEATURE_NAMES, FEATURE_VERSION
from proxy.models import META_PREFIX, _session

ONNX_OPSET = 15       # the highest opset onnxmltools' XGBoost converter supports here
ONNX_ML_OPSET = 3


def _is_xgboost(model) -> bool:
    return type(model).__module__.startswith("xgboost")


def _to_onnx(model, n_features: int):
    """(onnx ModelProto, output name, output column or None) for a fitted model."""
    if _is_xgboost(model):
        from onnxmltools import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType
        onx = convert_xgboost(model, initial_types=[("features", FloatTensorType([None, n_features]))],
                              target_opset=ONNX_OPSET)
        if hasattr(model, "predict_proba"):
            return onx, "probabilities", 1
        return onx, onx.graph.output[0].name, None
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {type(final): {"zipmap": False}} if is_classifier(final) else None
    onx = to_onnx(model, initial_types=[("features", FloatTensorType([None, n_features]))],
                  target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET}, options=options)
    names = [o.name for o in onx.graph.output]
    if is_classifier(final):
        from sklearn.neighbors import KNeighborsClassifier
        if isinstance(final, KNeighborsClassifier):  # serves the nearest core point's label
            return onx, names[0], None
        return onx, next(n for n in names if "prob" in n), 1
    if type(final).__name__ == "IsolationForest":
        return onx, "scores", None
    return onx, names[0], None


def export_onnx(model, kind: str, *, algorithm: str, metrics: dict, training_window: dict,
                extra: dict | None = None) -> bytes:
    """The model as ONNX bytes carrying pgpilot metadata for proxy.models.load_model to check."""
    names = FEATURE_NAMES[kind]
    onx, output, column = _to_onnx(model, len(names))
    meta = {
        "kind": kind, "algorithm": algorithm, "version": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "feature_names": list(names), "feature_version": FEATURE_VERSION, "training_window": training_window,
        "metrics": metrics, "output": output, "output_column": column, **(extra or {}),
    }
    del onx.metadata_props[:]
    for key, value in meta.items():
        prop = onx.metadata_props.add()
        prop.key = META_PREFIX + key
        prop.value = json.dumps(value, default=_json_default)
    onx.producer_name = "pgpilot"
    return onx.SerializeToString()


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def onnx_run(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """The main output (as named in the metadata) of ONNX bytes on rows X."""
    from proxy.models import read_metadata
    session = _session(onnx_bytes)
    meta = read_metadata(session)
    out = session.run([meta["output"]], {session.get_inputs()[0].name: np.asarray(X, dtype=np.float32)})[0]
    out = np.asarray(out)
    if out.ndim == 2 and meta.get("output_column") is not None:
        out = out[:, int(meta["output_column"])]
    return out.reshape(len(X), -1)[:, 0].astype(np.float64)


def onnx_agreement(onnx_bytes: bytes, native: np.ndarray, X: np.ndarray) -> dict:
    """Max and mean absolute difference between ONNX outputs and the native model's on the same rows."""
    got = onnx_run(onnx_bytes, X)
    diff = np.abs(got - np.asarray(native, dtype=np.float64))
    return {"rows": int(len(X)), "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
            "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0}


def inference_cost_us(onnx_bytes: bytes, X: np.ndarray, batch: int = 256, repeats: int = 3) -> dict:
    """Microseconds per row in onnxruntime (one thread): one row per call, and `batch` rows per call."""
    session = _session(onnx_bytes)
    name = session.get_inputs()[0].name
    X = np.asarray(X, dtype=np.float32)
    single_rows = X[:min(len(X), 500)]
    best_single = best_batch = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(len(single_rows)):
            session.run(None, {name: single_rows[i:i + 1]})
        best_single = min(best_single, (time.perf_counter() - t) / max(1, len(single_rows)) * 1e6)
        n = 0
        t = time.perf_counter()
        for start in range(0, len(X), batch):
            chunk = X[start:start + batch]
            session.run(None, {name: chunk})
            n += len(chunk)
        best_batch = min(best_batch, (time.perf_counter() - t) / max(1, n) * 1e6)
    return {"single_us": best_single, "batched_us": best_batch, "batch": batch}
