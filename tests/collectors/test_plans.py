"""The plans collector: EXPLAIN of frequent templates, generic plans for $n, and nothing executed."""
from __future__ import annotations

import pytest
from pglast.parser import fingerprint

from learning.collectors import run_collectors
from learning.collectors.plans import NotExplainable, parse_statement


@pytest.fixture
def shop(app):
    app.execute("CREATE TABLE products (id int PRIMARY KEY, name text, price int)")
    app.execute("INSERT INTO products SELECT g, 'p' || g, g % 100 FROM generate_series(1, 5000) g")
    app.execute("ANALYZE products")
    return app


def add_template(conn, sql: str, kind: str, events: int, sample_sql: str | None = None) -> str:
    """Record a template and `events` query events for it, as the proxy's log writer would."""
    fp = fingerprint(sql)
    conn.execute("INSERT INTO pgpilot.templates (fingerprint, normalized_sql, kind, first_seen, last_seen, "
                 "sample_sql) VALUES (%s, %s, %s, now(), now(), %s)", (fp, sql, kind, sample_sql))
    conn.execute("INSERT INTO pgpilot.query_events (ts, duration_us, fingerprint, kind, database) "
                 "SELECT now(), 100, %s, %s, current_database() FROM generate_series(1, %s)", (fp, kind, events))
    return fp


def plan_of(conn, fp: str) -> tuple | None:
    return conn.execute("SELECT source, total_cost, plan_rows, node_types FROM pgpilot.plans WHERE fingerprint = %s",
                        (fp,)).fetchone()


def test_a_frequent_parameterized_template_gets_a_generic_plan(app_dsn, shop):
    fp = add_template(shop, "SELECT name FROM products WHERE id = $1", "select", events=25)
    run_collectors(app_dsn, only={"plans"}, plans_min_calls=20)

    source, cost, rows, nodes = plan_of(shop, fp)
    assert source == "generic" and cost > 0 and rows == 1
    assert nodes == ["Index Scan"]


def test_a_sample_with_literals_is_explained_as_is(app_dsn, shop):
    fp = add_template(shop, "SELECT name FROM products WHERE price < $1", "select", events=25,
                      sample_sql="SELECT name FROM products WHERE price < 10")
    run_collectors(app_dsn, only={"plans"}, plans_min_calls=20)

    source, cost, rows, _ = plan_of(shop, fp)
    assert source == "sample" and cost > 0
    assert 300 <= rows <= 700  # about a tenth of 5000 rows, from the literal


def test_a_template_seen_less_often_than_the_threshold_is_not_explained(app_dsn, shop):
    fp = add_template(shop, "SELECT name FROM products WHERE id = $1", "select", events=19)
    run_collectors(app_dsn, only={"plans"}, plans_min_calls=20)

    assert plan_of(shop, fp) is None


def test_calls_counted_by_pg_stat_statements_qualify_a_template(app_dsn, shop):
    fp = add_template(shop, "SELECT price FROM products WHERE id = $1", "select", events=0)
    for i in range(25):
        shop.execute(f"SELECT price FROM products WHERE id = {i}")
    run_collectors(app_dsn, only={"statements", "plans"}, plans_min_calls=20)

    assert plan_of(shop, fp) is not None


def test_writes_are_explained_but_not_executed(app_dsn, shop):
    inserts = add_template(shop, "INSERT INTO products (id, name, price) VALUES ($1, $2, $3)", "insert", events=25)
    deletes = add_template(shop, "DELETE FROM products WHERE price > $1", "delete", events=25,
                           sample_sql="DELETE FROM products WHERE price > 0")
    run_collectors(app_dsn, only={"plans"}, plans_min_calls=20)

    assert plan_of(shop, inserts)[3][0] == "ModifyTable"
    assert plan_of(shop, deletes)[3][0] == "ModifyTable"
    assert shop.execute("SELECT count(*) FROM products").fetchone() == (5000,)


def test_a_template_whose_table_was_dropped_is_skipped_with_a_notice(app_dsn, shop):
    shop.execute("CREATE TABLE old_orders (id int)")
    gone = add_template(shop, "SELECT * FROM old_orders WHERE id = $1", "select", events=25)
    shop.execute("DROP TABLE old_orders")
    kept = add_template(shop, "SELECT name FROM products WHERE id = $1", "select", events=25)
    summary = run_collectors(app_dsn, only={"plans"}, plans_min_calls=20)

    assert plan_of(shop, gone) is None and plan_of(shop, kept) is not None
    [notice] = summary["plans"]["notices"]
    assert gone in notice and "no longer exists" in notice


def test_only_single_select_insert_update_delete_statements_are_explainable():
    assert parse_statement("UPDATE t SET a = $1 WHERE b = $2").parameters == 2
    for sql in ("SELECT 1; DROP TABLE t", "VACUUM t", "CREATE TABLE t (a int)"):
        with pytest.raises(NotExplainable):
            parse_statement(sql)
