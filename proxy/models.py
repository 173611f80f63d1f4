"""Loading served models from the registry with onnxruntime only, refusing any file that is corrupt or mismatched.

The learner (learning/registry.py) writes the registry; the proxy reads it through this module, which never
imports scikit-learn or xgboost. Layout under learning.model_dir:
    objects/<sha256>.onnx     a model, named by the sha256 of its bytes
    objects/<sha256>.json     a serving context (template statistics, known clients), same naming
    records/<sha256>.json     what the learner knows about a model (metrics, training window, ...)
    champions/<kind>.json     {"sha256": ..., "context_sha256": ..., "history": [...]}: the model in service
A model is refused unless its bytes hash to its name, onnxruntime loads it, and its metadata names the expected
kind, this code's FEATURE_VERSION and exactly FEATURE_NAMES[kind].
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from proxy.features import FEATURE_NAMES, FEATURE_VERSION, ServingContext

META_PREFIX = "pgpilot."


class ModelRejected(Exception):
    """A model file that must not be served; the message says which file and why."""


@dataclass
class LoadedModel:
    """An onnxruntime session with the metadata it was exported with."""

    kind: str
    sha256: str
    path: Path
    session: object
    metadata: dict
    feature_names: tuple[str, ...]
    output_name: str
    context: ServingContext | None = field(default=None)

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    def run(self, rows: np.ndarray) -> np.ndarray:
        """The model's main output for a (n, features) float32 array, as a flat float64 array."""
        out = self.session.run([self.output_name], {self.input_name: np.asarray(rows, dtype=np.float32)})[0]
        out = np.asarray(out)
        if out.ndim == 2 and out.shape[1] > 1 and self.metadata.get("output_column") is not None:
            out = out[:, int(self.metadata["output_column"])]
        return out.reshape(len(rows), -1)[:, 0].astype(np.float64)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(session) -> dict:
    """The pgpilot.* metadata_props of a session, JSON values decoded."""
    raw = session.get_modelmeta().custom_metadata_map
    meta = {}
    for key, value in raw.items():
        if key.startswith(META_PREFIX):
            try:
                meta[key[len(META_PREFIX):]] = json.loads(value)
            except ValueError:
                meta[key[len(META_PREFIX):]] = value
    return meta


def _session(data: bytes):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def load_model(path: str | Path, kind: str | None = None, expected_sha256: str | None = None) -> LoadedModel:
    """Load and validate one model file; raise ModelRejected with the reason when it must not be served."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelRejected(f"{path}: cannot read model file: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    expected = expected_sha256 or (path.stem if len(path.stem) == 64 else None)
    if expected is not None and digest != expected:
        raise ModelRejected(f"{path}: corrupt model file: sha256 is {digest[:12]}..., expected {expected[:12]}...")
    try:
        session = _session(data)
    except Exception as e:
        raise ModelRejected(f"{path}: onnxruntime cannot load the model: {str(e).splitlines()[0][:200]}") from None
    meta = read_metadata(session)
    model_kind = meta.get("kind")
    if kind is not None and model_kind != kind:
        raise ModelRejected(f"{path}: model kind is {model_kind!r}, expected {kind!r}")
    if model_kind not in FEATURE_NAMES:
        raise ModelRejected(f"{path}: unknown model kind {model_kind!r}")
    version = meta.get("feature_version")
    if version != FEATURE_VERSION:
        raise ModelRejected(f"{path}: trained on FEATURE_VERSION {version}, this code computes FEATURE_VERSION "
                            f"{FEATURE_VERSION}; retrain with `pgpilot learn --once`")
    names = tuple(meta.get("feature_names") or ())
    if names != FEATURE_NAMES[model_kind]:
        raise ModelRejected(f"{path}: feature names differ from this code's FEATURE_NAMES[{model_kind!r}]")
    width = session.get_inputs()[0].shape[-1]
    if isinstance(width, int) and width != len(names):
        raise ModelRejected(f"{path}: model expects {width} features, metadata names {len(names)}")
    outputs = [o.name for o in session.get_outputs()]
    output_name = meta.get("output") or outputs[0]
    if output_name not in outputs:
        raise ModelRejected(f"{path}: metadata names output {output_name!r}, the model has {outputs}")
    return LoadedModel(model_kind, digest, path, session, meta, names, output_name)


def load_context(path: str | Path, expected_sha256: str | None = None) -> ServingContext:
    """A serving context JSON, verified like a model file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelRejected(f"{path}: cannot read serving context: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelRejected(f"{path}: corrupt serving context: sha256 is {digest[:12]}..., "
                            f"expected {expected_sha256[:12]}...")
    try:
        context = ServingContext.from_json(data.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelRejected(f"{path}: serving context is not valid JSON: {e}") from None
    if context.feature_version != FEATURE_VERSION:
        raise ModelRejected(f"{path}: serving context has FEATURE_VERSION {context.feature_version}, "
                            f"expected {FEATURE_VERSION}")
    return context


def read_champion(model_dir: str | Path, kind: str) -> dict | None:
    """The champion pointer of a kind, or None when there is none yet."""
    pointer = Path(model_dir) / "champions" / f"{kind}.json"
    try:
        return json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelRejected(f"{pointer}: unreadable champion pointer: {e}") from None


def load_champion(model_dir: str | Path, kind: str) -> LoadedModel | None:
    """The validated champion of a kind with its serving context, or None when there is no champion."""
    pointer = read_champion(model_dir, kind)
    if pointer is None:
        return None
    root = Path(model_dir)
    model = load_model(root / "objects" / f"{pointer['sha256']}.onnx", kind, pointer["sha256"])
    if pointer.get("context_sha256"):
        model.context = load_context(root / "objects" / f"{pointer['context_sha256']}.json",
                                     pointer["context_sha256"])
    return model
