"""The in-process tier: cache entries bounded by bytes, evicted by value (GDSF) or recency (LRU), indexed by the
generation keys they depend on.

GreedyDual-Size-Frequency keeps what saves the most Postgres time per byte held: an entry's priority is
clock + hits x execution time / bytes, the least is evicted first, and the clock rises to each evicted
priority, so entries not hit for a while age out. An entry is only ever served after the generations just
read from the shared tier match its tag, so the table index exists to free memory early (pub/sub
invalidations), not for correctness.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from itertools import count

_OVERHEAD = 200   # bytes counted per entry beyond its payload (key, tag, bookkeeping)
EVICTIONS = ("gdsf", "lru")


class L1Entry:
    __slots__ = ("tag", "payload", "stats", "tables", "size", "value", "freq", "priority", "stamp")

    def __init__(self, tag: str, payload: bytes, stats, tables: tuple[str, ...], exec_us: float | None = None):
        self.tag = tag
        self.payload = payload
        self.stats = stats          # the template's TemplateStats (hits are counted there)
        self.tables = tables
        self.size = len(payload) + len(tag) + _OVERHEAD
        if exec_us is None and stats is not None and stats.offered:
            exec_us = stats.mean_exec_us    # read from the shared tier: the template's mean here
        # Postgres microseconds a hit saves, per byte held; None: never executed by this process (another proxy
        # stored it), valued as the entries stored lately are (L1Cache.put)
        self.value = exec_us / self.size if exec_us is not None else None
        self.freq = 1               # 1 + hits while held
        self.priority = 0.0
        self.stamp = 0              # which put made it: heap items of an entry since replaced are skipped


class L1Cache:
    def __init__(self, max_bytes: int, eviction: str = "gdsf"):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, not {eviction!r}")
        self.max_bytes = max_bytes
        self.eviction = eviction
        self.bytes = 0
        self._entries: dict[bytes, L1Entry] = OrderedDict() if eviction == "lru" else {}
        self._by_table: dict[str, set[bytes]] = {}
        self._heap: list[tuple[float, int, bytes]] = []   # gdsf: (priority when pushed, stamp, key), lazily invalidated
        self._stamps = count(1)
        self.clock = 0.0            # gdsf: the priority of the last entry evicted or turned away
        self.evictions = 0
        self.turned_away = 0        # gdsf: results worth less than everything held, not stored
        self._log_value = 0.0       # gdsf: moving average of log(value) of the entries stored with a known cost
        self.hit = self._hit_gdsf if eviction == "gdsf" else self._hit_lru

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> L1Entry | None:
        """The entry stored under key, if any; a lookup, not a hit (see hit)."""
        return self._entries.get(key)

    def _hit_gdsf(self, key: bytes, entry: L1Entry) -> None:
        """The entry was served: its priority rises (its heap item keeps the old one until it reaches the top)."""
        entry.freq += 1
        entry.priority = self.clock + entry.freq * entry.value

    def _hit_lru(self, key: bytes, entry: L1Entry) -> None:
        if self._entries.get(key) is entry:
            self._entries.move_to_end(key)

    def put(self, key: bytes, entry: L1Entry) -> None:
        if entry.size > self.max_bytes:
            return
        self.drop(key)
        if self.eviction == "gdsf":
            if entry.value is None:
                entry.value = math.exp(self._log_value)
            else:
                self._log_value += (math.log(entry.value + 1e-9) - self._log_value) / 64
            priority = self.clock + entry.value
            while self.bytes + entry.size > self.max_bytes and self._entries:
                victim, lowest = self._lowest()
                if lowest >= priority:     # worth less than anything held: not stored
                    self.clock = priority
                    self.turned_away += 1
                    return
                heapq.heappop(self._heap)
                self.clock = lowest
                self.drop(victim)
                self.evictions += 1
            entry.priority = priority
            entry.stamp = stamp = next(self._stamps)
            self._store(key, entry)
            heap = self._heap
            if len(heap) > 2 * len(self._entries) + 64:    # items of dropped entries: rebuild from the live ones
                self._heap = [(e.priority, e.stamp, k) for k, e in self._entries.items()]
                heapq.heapify(self._heap)
            else:
                heapq.heappush(heap, (priority, stamp, key))
            return
        self._store(key, entry)
        while self.bytes > self.max_bytes:
            self.drop(next(iter(self._entries)))
            self.evictions += 1

    def _store(self, key: bytes, entry: L1Entry) -> None:
        self._entries[key] = entry
        self.bytes += entry.size
        for t in entry.tables:
            self._by_table.setdefault(t, set()).add(key)

    def _lowest(self) -> tuple[bytes, float]:
        """The key and priority of the entry of least priority, its item left on top of the heap."""
        heap, entries = self._heap, self._entries
        while True:
            priority, stamp, key = heap[0]
            e = entries.get(key)
            if e is None or e.stamp != stamp:
                heapq.heappop(heap)                                  # dropped or replaced since
            elif e.priority > priority:
                heapq.heapreplace(heap, (e.priority, stamp, key))    # hit since: back at its priority now
            else:
                return key, priority

    def drop(self, key: bytes) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        self.bytes -= e.size
        for t in e.tables:
            keys = self._by_table.get(t)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_table[t]

    def drop_tables(self, tables) -> int:
        """Forget every entry that read one of these generation keys; how many went."""
        n = 0
        for t in tables:
            for key in list(self._by_table.get(t, ())):
                self.drop(key)
                n += 1
        return n

    def clear(self) -> None:
        self._entries.clear()
        self._by_table.clear()
        self._heap.clear()
        self.bytes = 0
