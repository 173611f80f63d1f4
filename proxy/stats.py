"""Counters the hot path bumps as plain integers; the admin console and /metrics read them at scrape time.

Nothing here takes a lock or formats anything per query: a statement costs a few integer additions and one
bisect into the duration buckets.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter

# Upper bounds (seconds) of the query duration histogram buckets; +Inf is implied.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_BUCKETS_US = tuple(int(b * 1e6) for b in DURATION_BUCKETS)


class TrafficStats:
    """Per (database, user): statements, transactions, errors, bytes and a duration histogram."""

    __slots__ = ("database", "user", "queries", "query_errors", "transactions", "query_us_total",
                 "xact_us_total", "bytes_in", "bytes_out", "duration_buckets", "errors_by_class")

    def __init__(self, database: str, user: str):
        self.database = database
        self.user = user
        self.queries = 0
        self.query_errors = 0
        self.transactions = 0
        self.query_us_total = 0
        self.xact_us_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.errors_by_class: Counter[str] = Counter()

    def statement(self, duration_us: int, sqlstate: str | None) -> None:
        self.queries += 1
        self.query_us_total += duration_us
        self.duration_buckets[bisect_left(_BUCKETS_US, duration_us)] += 1
        if sqlstate is not None:
            self.query_errors += 1
            self.errors_by_class[sqlstate[:2]] += 1


class ServerStats:
    """Process-wide counters, and the per (database, user) TrafficStats."""

    def __init__(self):
        self.clients_accepted = 0
        self.clients_refused = 0
        self.wait_timeouts = 0
        self.waits = 0
        self.wait_us_total = 0
        self.errors_by_sqlstate: Counter[str] = Counter()   # errors the proxy itself raised
        self.cancels = 0
        self.traffic: dict[tuple[str, str], TrafficStats] = {}

    def traffic_for(self, database: str, user: str) -> TrafficStats:
        key = (database, user)
        t = self.traffic.get(key)
        if t is None:
            t = self.traffic[key] = TrafficStats(database, user)
        return t

    def record_wait(self, us: int) -> None:
        self.waits += 1
        self.wait_us_total += us

    def count_error(self, sqlstate: str) -> None:
        self.errors_by_sqlstate[sqlstate] += 1
