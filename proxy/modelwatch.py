"""Watching the learner's model registry: each kind's champion loaded with onnxruntime and swapped in whole.

`ModelWatcher` looks at champions/<kind>.json under learning.model_dir every models.poll_interval seconds
(and at once when a message arrives on the Redis channel <cache.key_prefix><models.redis_channel>, when
cache.redis_url is set). A changed pointer is loaded by proxy.models.load_champion in a worker thread, which
checks the file's sha256, that onnxruntime loads it (one intra-op thread), its kind, FEATURE_VERSION and
feature names. A model that passes replaces the previous one in one assignment, and the listeners of its
kind are called with it; one that fails is refused: a log line, a count in `refused`, and the model in
service stays. A refused pointer is not retried until it changes again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from proxy.models import LoadedModel, ModelRejected, load_champion

log = logging.getLogger("pgpilot.models")

KINDS = ("anomaly", "cache", "time")


def _signature(path: Path) -> tuple | None:
    """What changes when a pointer is rewritten (the learner renames a new file over it), or None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ModelWatcher:
    """The champion in service per model kind, kept in step with the registry directory."""

    def __init__(self, model_dir: str | os.PathLike, poll_interval: float = 1.0, kinds=KINDS, *,
                 redis_url: str | None = None, redis_channel: str | None = None):
        self.model_dir = Path(model_dir)
        self.poll_interval = poll_interval
        self.kinds = tuple(kinds)
        self.redis_url = redis_url
        self.redis_channel = redis_channel
        self.current: dict[str, LoadedModel | None] = dict.fromkeys(self.kinds)
        self.loaded_at: dict[str, float] = {}
        self.loads: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.last_refusal: dict[str, str] = {}
        self.checks = 0
        self._seen: dict[str, tuple | None] = dict.fromkeys(self.kinds)
        self._in_service: dict[str, tuple] = {}    # kind -> (model sha256, context sha256) of the model in service
        self._listeners: dict[str, list[Callable[[LoadedModel | None], None]]] = {k: [] for k in self.kinds}
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def on_change(self, kind: str, listener: Callable[[LoadedModel | None], None]) -> None:
        """Call listener(model) in the event loop whenever the kind's model in service changes."""
        self._listeners[kind].append(listener)

    async def start(self) -> None:
        """Load what the registry holds now, then keep watching in the background."""
        await self.check()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._poll_loop(), name="models-poll"))
        if self.redis_url and self.redis_channel:
            self._tasks.append(loop.create_task(self._redis_loop(), name="models-redis"))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def poke(self) -> None:
        """Check the registry now rather than at the next poll."""
        self._poke.set()

    async def check(self) -> None:
        """Load every kind whose champion pointer changed since the last check."""
        self.checks += 1
        for kind in self.kinds:
            pointer_path = self.model_dir / "champions" / f"{kind}.json"
            sig = _signature(pointer_path)
            if sig == self._seen[kind]:
                continue
            self._seen[kind] = sig
            if sig is None:
                if self.current[kind] is not None:
                    log.warning("%s champion pointer %s is gone; %s stays in service", kind, pointer_path,
                                self.current[kind].sha256[:12])
                continue
            try:
                pointer = json.loads(pointer_path.read_text())
            except (OSError, ValueError) as e:
                self._refuse(kind, f"{pointer_path}: unreadable champion pointer: {e}")
                continue
            wanted = (pointer.get("sha256"), pointer.get("context_sha256"))
            if self.current[kind] is not None and wanted == self._in_service.get(kind):
                continue
            try:
                model = await asyncio.to_thread(load_champion, self.model_dir, kind)
            except ModelRejected as e:
                self._refuse(kind, str(e))
                continue
            except Exception as e:  # anything else odd in a file is a refusal too, never a crash
                self._refuse(kind, f"{pointer_path}: {type(e).__name__}: {e}")
                continue
            if model is None:
                continue
            self._in_service[kind] = wanted
            self._swap(kind, model)

    def _swap(self, kind: str, model: LoadedModel) -> None:
        previous = self.current[kind]
        self.current[kind] = model
        self.loaded_at[kind] = time.time()
        self.loads[kind] += 1
        log.info("%s model %s in service (%s, version %s)%s", kind, model.sha256[:12],
                 model.metadata.get("algorithm", "?"), model.metadata.get("version", "?"),
                 f", replacing {previous.sha256[:12]}" if previous is not None else "")
        for listener in self._listeners[kind]:
            try:
                listener(model)
            except Exception:  # a listener's bug must not keep the others from the new model
                log.exception("%s model listener failed", kind)

    def _refuse(self, kind: str, reason: str) -> None:
        self.refused[kind] += 1
        self.last_refusal[kind] = reason
        current = self.current[kind]
        log.error("%s model refused: %s; %s", kind, reason,
                  f"{current.sha256[:12]} stays in service" if current is not None else "none in service")

    async def _poll_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._poke.wait(), self.poll_interval)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()
            try:
                await self.check()
            except Exception:  # the watcher outlives any surprise in the directory
                log.exception("checking the model registry failed")

    async def _redis_loop(self) -> None:
        """A message on the channel triggers a check; a lost connection is retried with backoff."""
        import redis.asyncio as aioredis
        backoff = 0.5
        while not self._stopping:
            client = aioredis.from_url(self.redis_url)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(self.redis_channel)
                backoff = 0.5
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.poke()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("model channel %s: %s; retrying in %.1fs", self.redis_channel, e, backoff)
            finally:
                try:
                    await client.aclose()
                except Exception:
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def describe(self) -> list[dict]:
        """One dict per kind for SHOW MODELS."""
        out = []
        for kind in self.kinds:
            m = self.current[kind]
            out.append({
                "kind": kind, "sha256": m.sha256[:12] if m else None,
                "algorithm": m.metadata.get("algorithm") if m else None,
                "version": str(m.metadata.get("version")) if m else None,
                "feature_version": m.metadata.get("feature_version") if m else None,
                "context": bool(m is not None and m.context is not None),
                "loaded_at": self.loaded_at.get(kind), "loads": self.loads[kind], "refused": self.refused[kind],
                "last_refusal": self.last_refusal.get(kind)})
        return out
