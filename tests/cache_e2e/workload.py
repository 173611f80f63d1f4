"""Concurrent counter writers and readers for the cache acceptance tests, and the check that no read was stale.

Writers bump counters (UPDATE ... RETURNING v) and note when each commit was acknowledged; readers read them
(simple or extended protocol) and note when each read began. A read is stale when it returns less than a value
whose commit was acknowledged before the read began.
"""
from __future__ import annotations

import bisect
import random
import threading
import time
from dataclasses import dataclass, field

import psycopg

KEYS = 4                      # counters: few, so every read races writes of its row
WRITE_PAUSE = 0.05            # a writer waits up to this long between writes: readers get hits in between


@dataclass
class Run:
    """What the clients saw: acknowledged writes and reads per counter, and the errors."""

    acks: dict[int, list[tuple[float, int]]] = field(default_factory=lambda: {k: [] for k in range(1, KEYS + 1)})
    reads: list[tuple[int, float, int]] = field(default_factory=list)     # (counter, start, value)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return sum(len(a) for a in self.acks.values())

    def stale_reads(self, allowed_delay: float = 0.0) -> list[tuple[int, int, int, float]]:
        """Reads that returned less than a value acknowledged more than `allowed_delay` seconds before they began:
        (counter, value read, value expected, how long before the read the first newer value was acknowledged)."""
        stale = []
        for k, acks in self.acks.items():
            acks.sort()
            times = [t for t, _ in acks]
            best_so_far = []                 # highest value acknowledged up to each ack
            top = 0
            for _, v in acks:
                top = max(top, v)
                best_so_far.append(top)
            for key, start, value in self.reads:
                if key != k:
                    continue
                i = bisect.bisect_left(times, start - allowed_delay) - 1
                if i >= 0 and value < best_so_far[i]:
                    first_newer = next(t for t, v in acks if v > value)
                    stale.append((k, value, best_so_far[i], start - first_newer))
        return stale

    def start(self, writer_dsns: list[str], reader_dsns: list[str]) -> "Run":
        """One writer per writer DSN and one reader per reader DSN (every other pair of readers extended)."""
        self.threads = [threading.Thread(target=_writer, args=(dsn, self, i)) for i, dsn in enumerate(writer_dsns)]
        self.threads += [threading.Thread(target=_reader, args=(dsn, self, 100 + i, i % 4 >= 2))
                         for i, dsn in enumerate(reader_dsns)]
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> "Run":
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self


def _writer(dsn: str, run: Run, seed: int) -> None:
    rnd = random.Random(seed)
    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10,
                             options="-c synchronous_commit=on") as conn:
            while not run.stop.is_set():
                k = rnd.randint(1, KEYS)
                v = conn.execute("UPDATE counters SET v = v + 1 WHERE id = %s RETURNING v", [k]).fetchone()[0]
                acked = time.monotonic()
                with run.lock:
                    run.acks[k].append((acked, v))
                time.sleep(rnd.uniform(0, WRITE_PAUSE))
    except Exception as e:  # noqa: BLE001 - every client error is a finding
        run.errors.append(f"writer: {type(e).__name__}: {e}")


def _reader(dsn: str, run: Run, seed: int, extended: bool) -> None:
    rnd = random.Random(seed)
    seen = []
    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
            while not run.stop.is_set():
                k = rnd.randint(1, KEYS)
                start = time.monotonic()
                if extended:      # Parse/Bind/Describe/Execute/Sync
                    v = conn.execute("SELECT v FROM counters WHERE id = %s", [k]).fetchone()[0]
                else:             # a simple Query
                    v = conn.execute(f"SELECT v FROM counters WHERE id = {k}").fetchone()[0]
                seen.append((k, start, v))
    except Exception as e:  # noqa: BLE001
        run.errors.append(f"reader: {type(e).__name__}: {e}")
    with run.lock:
        run.reads.extend(seen)


def counters_sql() -> str:
    return (f"CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);"
            f"INSERT INTO counters SELECT g, 0 FROM generate_series(1, {KEYS}) g")
