"""Per-template statistics for SHOW QUERIES: ordering, percentiles, and the bound on tracked templates."""
from __future__ import annotations

import pytest

from proxy.querylog import QueryStats


def _feed(stats, fingerprint, durations, rows=1, failed=False):
    for d in durations:
        stats.observe(fingerprint, f"SELECT {fingerprint}", "select", d, rows, failed)


def test_top_orders_templates_by_total_time():
    stats = QueryStats()
    _feed(stats, "many_fast", [100] * 50)        # 5 ms in total
    _feed(stats, "few_slow", [10_000] * 2)       # 20 ms in total
    assert [r["fingerprint"] for r in stats.top(2)] == ["few_slow", "many_fast"]
    assert [r["fingerprint"] for r in stats.top(2, by="calls")] == ["many_fast", "few_slow"]


def test_a_row_carries_calls_times_rows_errors_and_the_normalized_query():
    stats = QueryStats()
    _feed(stats, "q", [1000, 3000], rows=5)
    _feed(stats, "q", [2000], rows=None, failed=True)
    assert stats.top(1) == [{"fingerprint": "q", "kind": "select", "calls": 3, "total_ms": 6.0, "mean_ms": 2.0,
                             "p95_ms": 3.0, "max_ms": 3.0, "rows": 10, "errors": 1, "query": "SELECT q"}]


def test_p95_is_exact_while_the_reservoir_holds_every_duration():
    stats = QueryStats(reservoir_size=100)
    _feed(stats, "q", [i * 1000 for i in range(1, 101)])
    assert stats.top(1)[0]["p95_ms"] == 96.0


def test_p95_stays_close_when_durations_outnumber_the_reservoir():
    stats = QueryStats(reservoir_size=64)
    _feed(stats, "q", [i for i in range(1, 100_001)])
    assert 85_000 <= stats.top(1)[0]["p95_ms"] * 1000 <= 100_000


def test_tracked_templates_are_bounded_and_the_most_called_survive():
    stats = QueryStats(max_templates=100)
    for i in range(10):
        _feed(stats, f"hot{i}", [10] * 100)
    for i in range(1000):
        _feed(stats, f"cold{i}", [10])
    assert len(stats) <= 110
    assert {f"hot{i}" for i in range(10)} <= {r["fingerprint"] for r in stats.top(200, by="calls")}


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="total_time"):
        QueryStats().top(5, by="speed")


def test_batches_keep_counters_exact_and_the_reservoir_uniform():
    stats = QueryStats(reservoir_size=64)
    values = list(range(1, 100_001))
    for start in range(0, len(values), 37):
        chunk = values[start:start + 37]
        stats.observe_many("q", "SELECT q", "select", chunk, [None if v % 10 else 2 for v in chunk],
                           sum(1 for v in chunk if v % 1000 == 0))
    row = stats.top(1)[0]
    assert (row["calls"], row["total_ms"], row["max_ms"], row["rows"], row["errors"]) == \
        (100_000, sum(values) / 1000, 100.0, 2 * 10_000, 100)
    samples = stats._templates["q"].samples
    assert len(samples) == 64 and len(set(samples)) == 64
    # Uniform over the whole stream: neither stuck in the first reservoir's fill nor in the last batches.
    assert sum(1 for v in samples if v <= 64) <= 3
    assert 30_000 <= sum(samples) / 64 <= 70_000
    assert 85_000 <= row["p95_ms"] * 1000 <= 100_000
