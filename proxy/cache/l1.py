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

_OVERHEAD = 200   # bytes counted per entry beyond its payload (key, tag, bookkeeping)
EVICTIONS = ("gdsf", "lru")


class GreedyDual:
    """GreedyDual-Size-Frequency priorities of the keys a cache holds, the least first: a key's priority is
    clock + (1 + hits) x value (Postgres time a hit saves per byte held), and the clock rises to each priority
    evicted or turned away. Kept on a heap invalidated lazily: a hit only raises the key's priority, and its
    item is moved when it reaches the top. The cache keeps its bytes; this only orders its keys. The proxy's
    in-process tier and the learner's cache simulator (learning/cache_model.py) both evict by it.

    What is held under a key (an L1Entry, or the simulator's Held) carries its own `value`, and `priority`,
    `freq` (1 + hits) and `stamp` set here, so a hit touches no dictionary."""

    __slots__ = ("clock", "_heap", "_held", "_stamp")

    def __init__(self):
        self.clock = 0.0
        self._heap: list[tuple] = []     # (priority when pushed, stamp, key)
        self._held: dict = {}            # key -> what is held
        self._stamp = 0                  # which add made it: items of a key dropped or added again are skipped

    def add(self, key, held, priority: float) -> None:
        """Hold key at `priority` (clock + value when it came, before make_room raised the clock)."""
        self._stamp += 1
        held.priority, held.freq, held.stamp = priority, 1, self._stamp
        self._held[key] = held
        heap = self._heap
        if len(heap) > 2 * len(self._held) + 64:     # items of dropped keys: rebuild from the live ones
            self._heap = [(h.priority, h.stamp, k) for k, h in self._held.items()]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(heap, (priority, self._stamp, key))

    def hit(self, held) -> None:
        held.freq += 1
        held.priority = self.clock + held.freq * held.value

    def make_room(self, priority: float):
        """The key of least priority, evicted for a new one of `priority` (the clock rises to the evicted
        priority); None when the new one is worth no more than everything held (some key must be held): it is
        turned away and the clock rises to its priority."""
        heap, by_key = self._heap, self._held
        while True:
            lowest, stamp, key = heap[0]
            h = by_key.get(key)
            if h is None or h.stamp != stamp:
                heapq.heappop(heap)                                  # dropped or added again since
            elif h.priority > lowest:
                heapq.heapreplace(heap, (h.priority, stamp, key))    # hit since: back at its priority now
            else:
                break
        if lowest >= priority:
            self.clock = priority
            return None
        heapq.heappop(heap)
        self.clock = lowest
        del by_key[key]
        return key

    def discard(self, key) -> None:
        self._held.pop(key, None)

    def clear(self) -> None:
        self._heap.clear()
        self._held.clear()


class Held:
    """What a GreedyDual holds for a key that has no object of its own (the simulator's results)."""

    __slots__ = ("value", "priority", "freq", "stamp")

    def __init__(self, value: float):
        self.value = value


class L1Entry:
    __slots__ = ("tag", "payload", "stats", "tables", "size", "value", "priority", "freq", "stamp")

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


class L1Cache:
    def __init__(self, max_bytes: int, eviction: str = "gdsf"):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, not {eviction!r}")
        self.max_bytes = max_bytes
        self.eviction = eviction
        self.bytes = 0
        self._entries: dict[bytes, L1Entry] = OrderedDict() if eviction == "lru" else {}
        self._by_table: dict[str, set[bytes]] = {}
        self._order = GreedyDual() if eviction == "gdsf" else None
        self.evictions = 0
        self.turned_away = 0        # gdsf: results worth less than everything held, not stored
        self._log_value = 0.0       # gdsf: moving average of log(value) of the entries stored with a known cost
        self.hit = self._hit_gdsf if eviction == "gdsf" else self._hit_lru

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def clock(self) -> float:
        """gdsf: the priority of the last entry evicted or turned away."""
        return self._order.clock if self._order is not None else 0.0

    def get(self, key: bytes) -> L1Entry | None:
        """The entry stored under key, if any; a lookup, not a hit (see hit)."""
        return self._entries.get(key)

    def _hit_gdsf(self, key: bytes, entry: L1Entry) -> None:
        """The entry was served: its priority rises."""
        self._order.hit(entry)      # an entry dropped or replaced since it was read: its old item is skipped

    def _hit_lru(self, key: bytes, entry: L1Entry) -> None:
        if self._entries.get(key) is entry:
            self._entries.move_to_end(key)

    def put(self, key: bytes, entry: L1Entry) -> None:
        if entry.size > self.max_bytes:
            return
        self.drop(key)
        order = self._order
        if order is not None:
            if entry.value is None:
                entry.value = math.exp(self._log_value)
            else:
                self._log_value += (math.log(entry.value + 1e-9) - self._log_value) / 64
            priority = order.clock + entry.value
            while self.bytes + entry.size > self.max_bytes and self._entries:
                victim = order.make_room(priority)
                if victim is None:     # worth less than anything held: not stored
                    self.turned_away += 1
                    return
                self._drop(victim)
                self.evictions += 1
            order.add(key, entry, priority)
            self._store(key, entry)
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

    def drop(self, key: bytes) -> None:
        if self._order is not None:
            self._order.discard(key)
        self._drop(key)

    def _drop(self, key: bytes) -> None:
        """Forget the entry (its key already gone from the eviction order)."""
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
        if self._order is not None:
            self._order.clear()
        self.bytes = 0
