"""The partition advisor on a logged event log: monthly range partitioning with a plan that runs, and "do not"."""
from __future__ import annotations

import pytest

from advisors.catalog import load_catalog
from advisors.partitions import advise_partitions, choose_interval, decide
from advisors.workload import load_workload
from proxy.config import AdvisorsConfig

pytestmark = pytest.mark.timeout(300)


def advise(conn, db, **kwargs):
    catalog = load_catalog(conn)
    workload = load_workload(conn, catalog, database=db.logged_as)
    return {a.table: a for a in advise_partitions(conn, workload, catalog, AdvisorsConfig(), **kwargs)}


def test_an_event_log_queried_by_month_gets_monthly_range_partitions_on_its_time_column(events_db, connect):
    advice = advise(connect(events_db.dsn), events_db)["public.events"]

    assert advice.decision == "partition"
    assert (advice.strategy, advice.key, advice.interval) == ("range", "ts", "month")
    assert advice.signals["retention_deletes"] == 1 and advice.signals["time_filter_share"] == 1.0
    checked = advice.validation
    assert checked["plan_ran"] and checked["rows_match"] and checked["partitions"] >= 24
    assert checked["cost_ratio"] < 1.0
    month_reports = [t for t in checked["templates"] if t["label"].startswith("SELECT kind")]
    assert month_reports and all(t["partitions_scanned"] <= 2 for t in month_reports)


def test_the_partition_plan_runs_and_keeps_every_row(events_db, connect):
    conn = connect(events_db.dsn)
    advice = advise(conn, events_db, validate_plan=False)["public.events"]
    rows_before = conn.execute("SELECT count(*), sum(id), max(ts) FROM events").fetchone()

    for step in advice.steps:
        if not step.sql.startswith("--"):
            conn.execute(step.sql)

    assert conn.execute("SELECT count(*), sum(id), max(ts) FROM events").fetchone() == rows_before
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'events'::regclass").fetchone()[0] == "p"
    leaves = conn.execute("SELECT count(*) FROM pg_partition_tree('events') WHERE isleaf").fetchone()[0]
    assert leaves >= 25  # two years of months, the months ahead, and the default partition
    assert conn.execute("SELECT count(*) FROM events_default").fetchone()[0] == 0
    # New rows keep their ids from the same sequence, which the new table now owns.
    new_id = conn.execute("INSERT INTO events (tenant_id, ts, kind) VALUES (1, now(), 'view') RETURNING id"
                          ).fetchone()[0]
    assert new_id > rows_before[0]
    conn.execute("DROP TABLE events_unpartitioned")
    assert conn.execute("SELECT nextval(pg_get_serial_sequence('events', 'id'))").fetchone()[0] > new_id


def test_a_small_lookup_table_is_not_partitioned(events_db, connect):
    advice = advise(connect(events_db.dsn), events_db, validate_plan=False)["public.event_kinds"]

    assert advice.decision == "do not partition"
    assert "too small" in advice.reason and not advice.steps


def test_partitions_are_as_fine_as_the_data_allows():
    assert choose_interval(rows=300_000, span_days=730, min_rows=10_000, max_partitions=1000, ahead=3) == "month"
    assert choose_interval(rows=50_000_000, span_days=730, min_rows=10_000, max_partitions=1000, ahead=3) == "day"
    assert choose_interval(rows=50_000, span_days=730, min_rows=10_000, max_partitions=1000, ahead=3) == "year"
    assert choose_interval(rows=10**10, span_days=3650, min_rows=10_000, max_partitions=1000, ahead=3) == "week"


def big_table(rows: float, gigabytes: float, tenant_values: int):
    from advisors.catalog import Column, Table
    t = Table(1, "public", "orders", "r", rows, 10, int(gigabytes * 2**30), int(gigabytes * 2**30))
    t.columns["account_id"] = Column("account_id", "integer", 1, True, n_distinct=tenant_values,
                                     most_common_vals=[str(i) for i in range(min(tenant_values, 100))])
    t.columns["total"] = Column("total", "numeric", 2, True, n_distinct=rows / 2)
    return t


def tenant_signals(table, share: float) -> dict:
    return {"rows": table.rows, "total_bytes": table.total_bytes, "growth_rows_per_day": None,
            "effective_cache_size_bytes": 4 << 30, "shared_buffers_bytes": 1 << 30, "calls": 100.0,
            "time_column": None, "time_filter_share": 0.0, "time_span_days": None, "retention_deletes": 0,
            "retention_delete_calls": 0, "retention_days": None, "referenced_by_foreign_keys": [],
            "tenant_columns": {"account_id": {"share": share, "n_distinct": table.columns["account_id"].n_distinct}}}


def test_a_large_table_read_per_tenant_gets_list_or_hash_partitions_by_tenant_count():
    few = big_table(5e7, 20, tenant_values=12)
    many = big_table(5e7, 20, tenant_values=50_000)
    settings = AdvisorsConfig()

    by_list = decide(few, tenant_signals(few, 0.95), settings)
    by_hash = decide(many, tenant_signals(many, 0.95), settings)
    rarely = decide(many, tenant_signals(many, 0.5), settings)

    assert (by_list.strategy, by_list.key, len(by_list.values)) == ("list", "account_id", 12)
    assert (by_hash.strategy, by_hash.key) == ("hash", "account_id") and 4 <= by_hash.modulus <= 64
    assert rarely.decision == "do not partition" and "rarely be pruned" in rarely.reason
