"""The in-process tier: an LRU of cache entries bounded by bytes, indexed by the generation keys they depend on.

An entry is only ever served after the generations just read from the shared tier match its tag, so this
index exists to free memory early (pub/sub invalidations), not for correctness.
"""
from __future__ import annotations

from collections import OrderedDict

_OVERHEAD = 200   # bytes counted per entry beyond its payload (key, tag, bookkeeping)


class L1Entry:
    __slots__ = ("tag", "payload", "stats", "tables", "size")

    def __init__(self, tag: str, payload: bytes, stats, tables: tuple[str, ...]):
        self.tag = tag
        self.payload = payload
        self.stats = stats          # the template's TemplateStats (hits are counted there)
        self.tables = tables
        self.size = len(payload) + len(tag) + _OVERHEAD


class L1Cache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, L1Entry] = OrderedDict()
        self._by_table: dict[str, set[bytes]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> L1Entry | None:
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
        return e

    def put(self, key: bytes, entry: L1Entry) -> None:
        if entry.size > self.max_bytes:
            return
        self.drop(key)
        self._entries[key] = entry
        self.bytes += entry.size
        for t in entry.tables:
            self._by_table.setdefault(t, set()).add(key)
        while self.bytes > self.max_bytes:
            old_key = next(iter(self._entries))
            self.drop(old_key)
            self.evictions += 1

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
        self.bytes = 0
