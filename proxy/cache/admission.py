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

    __slots__ = ("template", "key", "offered", "admitted", "hits", "exec_us_sum", "bytes_sum", "declined",
                 "skipped", "exec_us_floor", "recent_lookups", "recent_hits", "explore_gap")

    def __init__(self, template: str, key: str | None = None):
        self.template = template                  # a text of the template (the first seen)
        self.key = key if key is not None else template   # what names it: the text with its constants replaced
        self.offered = 0        # fills proposed (a miss that ran on Postgres)
        self.admitted = 0       # fills stored
        self.hits = 0           # answers served from the cache
        self.exec_us_sum = 0    # Postgres execution time of the offered fills
        self.bytes_sum = 0      # result bytes of the offered fills
        self.declined = 0       # offers declined, decaying on admissions (high: the cache stops looking it up)
        self.skipped = 0        # executions not looked up since
        self.exec_us_floor = 0.0   # tracks the fastest recent executions: the service time a hit saves
        self.recent_lookups = 0    # lookups that reached the shared tier (hit or miss), halved every 1024
        self.recent_hits = 0
        self.explore_gap = 0       # executions between explorations while declined (0: the configured one)

    def executed(self, exec_us: int) -> None:
        """One execution on Postgres (a miss offered as a fill)."""
        self.offered += 1
        self.exec_us_sum += exec_us
        f = self.exec_us_floor
        # Down at once, up by 1/64 of the gap: under load most executions wait for a CPU, and a hit saves the
        # work, not the wait.
        self.exec_us_floor = exec_us if (exec_us < f or not f) else f + (exec_us - f) / 64

    def looked_up(self, hit: bool) -> None:
        if self.recent_lookups >= 1024:
            self.recent_lookups >>= 1
            self.recent_hits >>= 1
        self.recent_lookups += 1
        if hit:
            self.recent_hits += 1
            self.hits += 1

    @property
    def hit_ratio(self) -> float:
        """Hits per lookup, recently."""
        return self.recent_hits / self.recent_lookups if self.recent_lookups else 0.0

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
                "reuse": round(self.reuse, 3), "hit_ratio": round(self.hit_ratio, 3),
                "mean_exec_us": round(self.mean_exec_us, 1), "floor_exec_us": round(self.exec_us_floor, 1),
                "mean_bytes": round(self.mean_bytes, 1)}


class AdmissionPolicy(Protocol):
    def admit(self, stats: TemplateStats) -> bool: ...


class HeuristicAdmission:
    """Admit while a template is new; then only if its lookups hit often enough to pay for themselves, and its
    entries saved enough Postgres time per stored entry.

    Lookups pay when hit_ratio x service time >= (1 - hit_ratio) x lookup_us: a hit saves the template's service
    time (its fastest recent executions: under load the rest is waiting, which a hit does not save for the
    other clients), a miss costs a lookup and a fill on top of the execution. Judged once `warmup` x 8 lookups
    were seen; lookup_us 0 turns the rule off.
    Then saved = reuse x mean execution time; admitted when saved >= min_saved_us x (1 + mean_bytes / size_scale),
    so large results must save proportionally more. A template that does not qualify is still admitted once
    every `explore_every` offers, so its statistics keep up with a workload that changes.
    """

    def __init__(self, warmup: int = 8, min_saved_us: float = 50.0, explore_every: int = 16,
                 size_scale: int = 65536, lookup_us: float = 100.0):
        self.warmup = warmup
        self.min_saved_us = min_saved_us
        self.explore_every = explore_every
        self.size_scale = size_scale
        self.lookup_us = lookup_us

    def admit(self, stats: TemplateStats) -> bool:
        if stats.admitted < self.warmup:
            return True
        if self.lookup_us and stats.recent_lookups >= 8 * max(1, self.warmup):
            h = stats.hit_ratio
            if h * stats.exec_us_floor < (1.0 - h) * self.lookup_us:
                return stats.offered % self.explore_every == 0
        saved = stats.reuse * stats.mean_exec_us
        if saved >= self.min_saved_us * (1.0 + stats.mean_bytes / self.size_scale):
            return True
        return stats.offered % self.explore_every == 0


class TemplateTable:
    """TemplateStats by template key, the least recently used forgotten beyond `limit`."""

    def __init__(self, limit: int = 20_000):
        self.limit = limit
        self._stats: OrderedDict[str, TemplateStats] = OrderedDict()

    def get(self, key: str, text: str | None = None) -> TemplateStats:
        s = self._stats.get(key)
        if s is None:
            s = self._stats[key] = TemplateStats(text or key, key)
            if len(self._stats) > self.limit:
                self._stats.popitem(last=False)
        else:
            self._stats.move_to_end(key)
        return s

    def peek(self, template: str) -> TemplateStats | None:
        return self._stats.get(template)

    def __len__(self) -> int:
        return len(self._stats)

    def top(self, n: int = 20) -> list[dict]:
        return [s.as_dict() for s in sorted(self._stats.values(), key=lambda s: -s.hits)[:n]]
