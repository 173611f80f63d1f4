"""The index advisor on a logged TPC-H workload: useful indexes, no regression, drop advice, nothing unasked."""
from __future__ import annotations

import json

import pytest

from advisors.catalog import load_catalog
from advisors.cli import main as advise_main
from advisors.indexes import AdvisorSettings, advise_indexes, apply_advice
from advisors.workload import load_workload
from tests.advisors.conftest import UNSEEN

pytestmark = pytest.mark.timeout(300)


def advise(conn, db, budget: int, **kwargs):
    catalog = load_catalog(conn)
    workload = load_workload(conn, catalog, database=db.logged_as)
    return advise_indexes(conn, workload, catalog, budget, AdvisorSettings(), **kwargs)


def explain_cost(conn, sql: str) -> float:
    return conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()[0][0]["Plan"]["Total Cost"]


def index_definitions(conn) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")}


def test_advice_for_a_logged_workload_lowers_its_estimated_cost(tpch_advice):
    advice = tpch_advice

    assert advice.templates == 22 and advice.instance_sources == {"logged": 22}
    assert advice.creates, "no index advised for TPC-H"
    assert advice.cost_after < 0.5 * advice.cost_before
    assert 0 < advice.used_bytes <= advice.budget_bytes
    for rec in advice.creates:
        assert rec.ddl.startswith("CREATE INDEX CONCURRENTLY")
        assert rec.templates and all(e.cost_after < e.cost_before for e in rec.templates)
    # Q17 and Q20 look up lineitem by part: the advice must serve that lookup.
    assert any(r.spec.table == "public.lineitem" and r.spec.columns[0] == "l_partkey" for r in advice.creates)


def test_advice_from_logged_instances_does_not_regress_unseen_instances(tpch_db, tpch_advice, connect):
    conn = connect(tpch_db.dsn)
    unseen = {n: sqls[UNSEEN] for n, sqls in tpch_db.instances.items()}
    before = {n: [explain_cost(conn, s) for s in sqls] for n, sqls in unseen.items()}
    apply_advice(conn, tpch_advice, log_each=lambda _: None)
    conn.execute("ANALYZE")
    after = {n: [explain_cost(conn, s) for s in sqls] for n, sqls in unseen.items()}

    for n in unseen:
        assert sum(after[n]) <= 1.10 * sum(before[n]), f"Q{n} regressed: {before[n]} -> {after[n]}"
    assert sum(map(sum, after.values())) < 0.5 * sum(map(sum, before.values()))


def test_nothing_is_created_or_dropped_without_the_apply_step(tpch_db, connect, capsys):
    conn = connect(tpch_db.dsn)
    conn.execute("CREATE INDEX lineitem_comment_unused ON lineitem (l_comment)")
    indexes_before = index_definitions(conn)

    code = advise_main(["indexes", "--dsn", tpch_db.dsn, "--database", tpch_db.logged_as, "--budget", "20MB",
                        "--format", "sql"])

    script = capsys.readouterr().out
    assert code == 0
    assert "CREATE INDEX CONCURRENTLY" in script and "DROP INDEX CONCURRENTLY public.lineitem_comment_unused" in script
    assert index_definitions(conn) == indexes_before


def test_the_apply_step_creates_the_advised_indexes(tpch_db, connect, capsys):
    conn = connect(tpch_db.dsn)
    code = advise_main(["indexes", "--dsn", tpch_db.dsn, "--database", tpch_db.logged_as, "--budget", "20MB",
                        "--format", "json", "--apply"])
    advice = json.loads(capsys.readouterr().out)
    assert code == 0
    names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    created = [r["index_name"] for r in advice["recommendations"] if r["action"] == "create"]
    assert created and set(created) <= names


def test_planted_duplicate_unused_and_invalid_indexes_get_drop_advice(tpch_db, connect):
    conn = connect(tpch_db.dsn)
    conn.execute("CREATE INDEX orders_custkey_a ON orders (o_custkey)")
    conn.execute("CREATE INDEX orders_custkey_b ON orders (o_custkey)")
    conn.execute("CREATE INDEX lineitem_comment_unused ON lineitem (l_comment)")
    with pytest.raises(Exception):  # duplicate keys: the concurrent build fails and leaves an invalid index
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY orders_status_invalid ON orders (o_orderstatus)")

    advice = advise(conn, tpch_db, budget=20 << 20)
    drops = {r.index_name: r.reason for r in advice.drops}

    assert drops.get("orders_custkey_b", "").startswith("duplicate of orders_custkey_a")
    # One copy stays, unless an advised index takes over its job.
    assert "orders_custkey_a" not in drops or "advised index" in drops["orders_custkey_a"]
    assert drops.get("lineitem_comment_unused", "").startswith("unused")
    assert drops.get("orders_status_invalid", "").startswith("invalid")
    assert not any(name.endswith("_pkey") for name in drops)


def test_each_run_records_its_advice_and_checks_what_became_of_earlier_advice(tpch_db, connect, capsys):
    conn = connect(tpch_db.dsn)
    args = ["indexes", "--dsn", tpch_db.dsn, "--database", tpch_db.logged_as, "--budget", "20MB", "--format", "json"]
    assert advise_main(args + ["--apply"]) == 0
    first = json.loads(capsys.readouterr().out)
    for n in (17, 20):  # the workload goes on, now with the new indexes
        conn.execute(tpch_db.instances[n][5]).fetchall()
    conn.execute("SELECT pg_stat_force_next_flush()")

    assert advise_main(args) == 0
    second = json.loads(capsys.readouterr().out)

    created = {r["index_name"] for r in first["recommendations"] if r["action"] == "create"}
    checks = {c["object_name"]: c for c in second["earlier_advice"] if c["kind"] == "create_index"}
    assert created <= set(checks)
    assert all(checks[name]["applied"] for name in created)
    assert any(checks[name]["idx_scan"] for name in created)
    assert any(checks[name]["outcome"].startswith("applied, helping") for name in created)
    logged = conn.execute("SELECT count(*) FROM pgpilot.advice_checks").fetchone()[0]
    assert logged >= len(created)
