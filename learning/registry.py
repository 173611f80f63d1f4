"""The model registry on disk: content-addressed ONNX files, a JSON record each, and a champion pointer per kind.

Layout (read by proxy.models):
    objects/<sha256>.onnx | objects/<sha256>.json (serving context)   named by the sha256 of their bytes
    records/<sha256>.json     kind, algorithm, metrics, training window, FEATURE_VERSION, context, created
    champions/<kind>.json     {"sha256", "context_sha256", "metric", "score", "history": [older pointers]}
A model enters only if proxy.models.load_model accepts it (bytes hash to the name, onnxruntime loads it, kind,
FEATURE_VERSION and feature names match this code). It becomes champion only if it beats the current champion
on the same held-out data. Every pointer change is an atomic rename, so a reader never sees half a file, and
`rollback(kind)` restores the previous champion after checking that its file is still intact.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

from proxy.models import LoadedModel, ModelRejected, load_champion, load_context, load_model, read_champion

HISTORY_KEPT = 20


class RegistryError(Exception):
    """A registry operation that cannot be done (no champion to roll back to, unknown model...)."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Registry:
    """Models and champions under one directory (learning.model_dir)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.root = Path(model_dir)

    def object_path(self, sha256: str, suffix: str = ".onnx") -> Path:
        return self.root / "objects" / f"{sha256}{suffix}"

    # -- adding

    def add_context(self, context_json: str) -> str:
        """Store a serving context JSON; returns its sha256."""
        data = context_json.encode()
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha, ".json")
        if not path.exists():
            _atomic_write(path, data)
        load_context(path, sha)
        return sha

    def add(self, onnx_bytes: bytes, record: dict, context_json: str | None = None) -> str:
        """Store a model and its record; returns its sha256. Raises ModelRejected (nothing kept) if it is unusable."""
        sha = hashlib.sha256(onnx_bytes).hexdigest()
        path = self.object_path(sha)
        existed = path.exists()
        if not existed:
            _atomic_write(path, onnx_bytes)
        try:
            model = load_model(path, record.get("kind"), sha)
        except ModelRejected:
            if not existed:
                path.unlink(missing_ok=True)
            raise
        context_sha = self.add_context(context_json) if context_json is not None else None
        full = {"sha256": sha, "kind": model.kind, "algorithm": model.metadata.get("algorithm"),
                "feature_version": model.metadata.get("feature_version"), "created": _now(),
                "context_sha256": context_sha, "file": str(path.relative_to(self.root)), **record}
        _atomic_write(self.root / "records" / f"{sha}.json", json.dumps(full, indent=2, sort_keys=True).encode())
        return sha

    def record(self, sha256: str) -> dict:
        try:
            return json.loads((self.root / "records" / f"{sha256}.json").read_text())
        except FileNotFoundError:
            raise RegistryError(f"no model {sha256[:12]}... in {self.root}") from None

    def records(self, kind: str | None = None) -> list[dict]:
        out = []
        for path in sorted((self.root / "records").glob("*.json")):
            try:
                r = json.loads(path.read_text())
            except ValueError:
                continue
            if kind is None or r.get("kind") == kind:
                out.append(r)
        return sorted(out, key=lambda r: r.get("created", ""))

    # -- champions

    def champion(self, kind: str) -> dict | None:
        return read_champion(self.root, kind)

    def load_champion(self, kind: str) -> LoadedModel | None:
        """The champion, validated (raises ModelRejected if its file is corrupt or mismatched)."""
        return load_champion(self.root, kind)

    def _pointer(self, kind: str, sha: str, history: list, **extra) -> dict:
        record = self.record(sha)
        return {"kind": kind, "sha256": sha, "context_sha256": record.get("context_sha256"),
                "feature_version": record.get("feature_version"), "algorithm": record.get("algorithm"),
                "promoted_at": _now(), "history": history[:HISTORY_KEPT], **extra}

    def _write_pointer(self, kind: str, pointer: dict) -> None:
        _atomic_write(self.root / "champions" / f"{kind}.json", json.dumps(pointer, indent=2).encode())

    def _validate(self, kind: str, sha: str) -> None:
        load_model(self.object_path(sha), kind, sha)
        context_sha = self.record(sha).get("context_sha256")
        if context_sha:
            load_context(self.object_path(context_sha, ".json"), context_sha)

    def promote(self, kind: str, sha: str, *, metric: str, score: float, champion_score: float | None,
                higher_is_better: bool) -> tuple[bool, str]:
        """Make `sha` the champion if it beats the champion's score on the same held-out data.

        champion_score is the current champion's score on that data (None: there is no champion, or it cannot
        be evaluated because it was built for another FEATURE_VERSION). Returns (promoted, reason). Raises
        ModelRejected, leaving the champion as it was, if the candidate's file is unusable.
        """
        self._validate(kind, sha)
        current = self.champion(kind)
        if current is not None and current.get("sha256") == sha:
            return False, "already champion"
        if current is not None and champion_score is not None:
            better = score > champion_score if higher_is_better else score < champion_score
            if not better:
                return False, (f"{metric} {score:.4g} does not beat the champion's {champion_score:.4g} "
                               f"on the same held-out data")
        history = []
        if current is not None:
            history = [{"sha256": current["sha256"], "promoted_at": current.get("promoted_at")}] \
                + current.get("history", [])
        self._write_pointer(kind, self._pointer(kind, sha, history, metric=metric, score=score,
                                                previous_score=champion_score))
        if current is None:
            return True, "first model of its kind"
        if champion_score is None:
            return True, "the champion could not be evaluated on this data"
        return True, f"{metric} {score:.4g} beats the champion's {champion_score:.4g}"

    def rollback(self, kind: str) -> dict:
        """Restore the previous champion of a kind; refuses (and changes nothing) if its file is unusable."""
        current = self.champion(kind)
        if current is None:
            raise RegistryError(f"no champion of kind {kind!r} in {self.root}")
        history = current.get("history", [])
        if not history:
            raise RegistryError(f"the {kind} champion {current['sha256'][:12]}... has no predecessor")
        previous = history[0]["sha256"]
        try:
            self._validate(kind, previous)
        except ModelRejected as e:
            raise ModelRejected(f"rollback of {kind} refused, the champion stays {current['sha256'][:12]}...: {e}") \
                from None
        record = self.record(previous)
        pointer = self._pointer(kind, previous, history[1:], rolled_back_from=current["sha256"],
                                metric=record.get("metric"), score=record.get("score"))
        self._write_pointer(kind, pointer)
        return pointer
