"""The resources collector: table and index sizes, scans, unused indexes, and bloat compared with pgstattuple."""
from __future__ import annotations

import pytest

from learning.collectors import run_collectors


@pytest.fixture
def orders(app):
    """10,000 rows of ~100 bytes, 30% deleted with autovacuum off, then analyzed: known dead space."""
    app.execute("CREATE TABLE orders (id int PRIMARY KEY, note text NOT NULL) WITH (autovacuum_enabled = off)")
    app.execute("INSERT INTO orders SELECT g, repeat('x', 100) FROM generate_series(1, 10000) g")
    app.execute("DELETE FROM orders WHERE id % 10 < 3")
    app.execute("SELECT pg_stat_force_next_flush()")  # else ANALYZE's counts get the unflushed changes added again
    app.execute("ANALYZE orders")
    return app


def measured_bloat(app, table: str) -> float:
    """Exact dead + free share of the heap, by pgstattuple (a full scan)."""
    app.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    return app.execute("SELECT dead_tuple_percent + free_percent FROM pgstattuple(%s)", (table,)).fetchone()[0]


def bloat_row(app, table: str) -> tuple:
    return app.execute("SELECT bloat_percent, bloat_method FROM pgpilot.table_stats WHERE relname = %s",
                       (table,)).fetchone()


def test_bloat_from_pgstattuple_approx_is_within_10_points_of_pgstattuple(app_dsn, orders):
    run_collectors(app_dsn, only={"resources"})

    percent, method = bloat_row(orders, "orders")
    assert method == "pgstattuple_approx"
    assert abs(percent - measured_bloat(orders, "orders")) <= 10


def test_bloat_estimated_from_statistics_is_within_10_points_of_pgstattuple(pg, fresh_db, app_dsn, orders, role):
    # A role that may neither install nor run pgstattuple gets the statistical estimate.
    orders.execute(f"GRANT SELECT ON orders TO {role}")
    summary = run_collectors(app_dsn, {fresh_db: pg.dsn_for(fresh_db).replace("postgres@", f"{role}@")},
                             only={"resources"})

    percent, method = bloat_row(orders, "orders")
    assert method == "statistical"
    assert any("pgstattuple" in n for n in summary["resources"]["notices"])
    assert abs(percent - measured_bloat(orders, "orders")) <= 10


def test_a_table_without_dead_space_shows_little_bloat(app_dsn, app):
    app.execute("CREATE TABLE tidy (id int, note text) WITH (autovacuum_enabled = off)")
    app.execute("INSERT INTO tidy SELECT g, repeat('y', 100) FROM generate_series(1, 10000) g")
    app.execute("ANALYZE tidy")
    run_collectors(app_dsn, only={"resources"})

    percent, _ = bloat_row(app, "tidy")
    assert percent < 5


def test_table_row_has_sizes_scans_and_tuples(app_dsn, orders):
    orders.execute("SELECT count(*) FROM orders")
    orders.execute("SELECT note FROM orders WHERE id = 5")
    orders.execute("SELECT pg_stat_force_next_flush()")
    run_collectors(app_dsn, only={"resources"})

    total, table, indexes, live, dead, seq_scan, idx_scan, hit_ratio = orders.execute(
        "SELECT total_bytes, table_bytes, indexes_bytes, n_live_tup, n_dead_tup, seq_scan, idx_scan, heap_hit_ratio "
        "FROM pgpilot.table_stats WHERE relname = 'orders'").fetchone()
    assert total >= table + indexes and table > 0 and indexes > 0
    assert (live, dead) == (7000, 3000)
    assert seq_scan >= 1 and idx_scan >= 1
    assert 0 < hit_ratio <= 1


def test_only_indexes_never_scanned_and_enforcing_nothing_are_unused(app_dsn, app):
    app.execute("CREATE TABLE parcels (id int PRIMARY KEY, label text, weight int)")
    app.execute("INSERT INTO parcels SELECT g, 'p' || g, g % 50 FROM generate_series(1, 1000) g")
    app.execute("CREATE INDEX parcels_weight ON parcels (weight)")
    app.execute("CREATE INDEX parcels_label ON parcels (label)")
    app.execute("CREATE UNIQUE INDEX parcels_label_id ON parcels (label, id)")
    app.execute("SET enable_seqscan = off")
    app.execute("SELECT count(*) FROM parcels WHERE weight = 5")  # only parcels_weight can serve it
    app.execute("SELECT pg_stat_force_next_flush()")
    run_collectors(app_dsn, only={"resources"})

    flags = dict(app.execute("SELECT indexrelname, unused FROM pgpilot.index_stats "
                             "WHERE relname = 'parcels'").fetchall())
    assert flags == {"parcels_pkey": False, "parcels_label_id": False, "parcels_weight": False, "parcels_label": True}
