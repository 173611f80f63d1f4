"""Admission: whether a query template's results are worth storing, decided per template from its statistics.

`AdmissionPolicy.admit(stats)` is the whole interface; the learned model (reuse before invalidation x time
saved vs bytes, predicted from features shared with the learner) plugs in as another policy. Until one is
loaded, `HeuristicAdmission` decides from what the cache itself observed about the template.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class TemplateStats:
    """What the cache saw of one query template (cumulative since the proxy started)."""

    __slots__ = ("template", "offered", "admitted", "hits", "exec_us_sum", "bytes_sum")

    def __init__(self, template: str):
        self.template = template
        self.offered = 0        # fills proposed (a miss that ran on Postgres)
        self.admitted = 0       # fills stored
        self.hits = 0           # answers served from the cache
        self.exec_us_sum = 0    # Postgres execution time of the offered fills
        self.bytes_sum = 0      # result bytes of the offered fills

    @property
    def reuse(self) -> float:
        """Hits per stored entry: how often an entry was reused before it was invalidated or evicted."""
        return self.hits / self.admitted if self.admitted else 0.0

    @property
    def mean_exec_us(self) -> float:
        return self.exec_us_sum / self.offered if self.offered else 0.0

    @property
    def mean_bytes(self) -> float:
        return self.bytes_sum / self.offered if self.offered else 0.0

    def as_dict(self) -> dict:
        return {"template": self.template, "offered": self.offered, "admitted": self.admitted, "hits": self.hits,
                "reuse": round(self.reuse, 3), "mean_exec_us": round(self.mean_exec_us, 1),
                "mean_bytes": round(self.mean_bytes, 1)}


class AdmissionPolicy(Protocol):
    def admit(self, stats: TemplateStats) -> bool: ...


class HeuristicAdmission:
    """Admit while a template is new; then only if its entries saved enough Postgres time per stored entry.

    saved = reuse x mean execution time; admitted when saved >= min_saved_us x (1 + mean_bytes / size_scale),
    so large results must save proportionally more. A template that does not qualify is still admitted once
    every `explore_every` offers, so its statistics keep up with a workload that changes.
    """

    def __init__(self, warmup: int = 8, min_saved_us: float = 50.0, explore_every: int = 16,
                 size_scale: int = 65536):
        self.warmup = warmup
        self.min_saved_us = min_saved_us
        self.explore_every = explore_every
        self.size_scale = size_scale

    def admit(self, stats: TemplateStats) -> bool:
        if stats.admitted < self.warmup:
            return True
        saved = stats.reuse * stats.mean_exec_us
        if saved >= self.min_saved_us * (1.0 + stats.mean_bytes / self.size_scale):
            return True
        return stats.offered % self.explore_every == 0


class TemplateTable:
    """TemplateStats by template, the least recently used forgotten beyond `limit`."""

    def __init__(self, limit: int = 20_000):
        self.limit = limit
        self._stats: OrderedDict[str, TemplateStats] = OrderedDict()

    def get(self, template: str) -> TemplateStats:
        s = self._stats.get(template)
        if s is None:
            s = self._stats[template] = TemplateStats(template)
            if len(self._stats) > self.limit:
                self._stats.popitem(last=False)
        else:
            self._stats.move_to_end(template)
        return s

    def peek(self, template: str) -> TemplateStats | None:
        return self._stats.get(template)

    def __len__(self) -> int:
        return len(self._stats)

    def top(self, n: int = 20) -> list[dict]:
        return [s.as_dict() for s in sorted(self._stats.values(), key=lambda s: -s.hits)[:n]]
