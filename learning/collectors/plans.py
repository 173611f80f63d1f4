"""The plans collector: EXPLAIN (FORMAT JSON), never ANALYZE, of the frequent SELECT/INSERT/UPDATE/DELETE templates."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import psycopg
from pglast import parser as pg_parser
from psycopg.types.json import Jsonb

from learning.collectors.common import CollectorResult, Target, error_text, write_rows

EXPLAINABLE = {"SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete"}

# Templates seen at least min_calls times, counted from the proxy's log over a window or from
# pg_stat_statements' cumulative calls in the latest snapshot, whichever is larger.
CANDIDATES_SQL = """
WITH logged AS (
    SELECT fingerprint, count(*) AS calls
    FROM pgpilot.query_events
    WHERE ts > now() - make_interval(hours => %(window_hours)s) AND (database = %(database)s OR %(any_database)s)
    GROUP BY fingerprint
),
tracked AS (
    SELECT fingerprint, sum(calls) AS calls
    FROM pgpilot.statement_snapshots
    WHERE database = %(database)s AND fingerprint IS NOT NULL
      AND ts = (SELECT max(ts) FROM pgpilot.statement_snapshots WHERE database = %(database)s)
    GROUP BY fingerprint
)
SELECT t.fingerprint, t.normalized_sql, t.sample_sql,
       greatest(coalesce(l.calls, 0), coalesce(s.calls, 0))::bigint AS calls
FROM pgpilot.templates t
LEFT JOIN logged l USING (fingerprint)
LEFT JOIN tracked s USING (fingerprint)
WHERE t.kind IN ('select', 'insert', 'update', 'delete')
  AND greatest(coalesce(l.calls, 0), coalesce(s.calls, 0)) >= %(min_calls)s
ORDER BY calls DESC, t.fingerprint
LIMIT %(max_templates)s
"""

PREPARED_NAME = "pgpilot_collector_plan"
PLAN_COLUMNS = ("ts", "database", "fingerprint", "source", "calls", "plan", "startup_cost", "total_cost",
                "plan_rows", "plan_width", "node_types", "relations", "indexes", "shape_hash")


class NotExplainable(ValueError):
    """The text is not exactly one SELECT, INSERT, UPDATE or DELETE."""


@dataclass
class Statement:
    sql: str
    parameters: int   # highest $n it references; 0 for a statement with literals only


def parse_statement(sql: str) -> Statement:
    """Check that sql is one explainable statement and count its $n parameters."""
    try:
        tree = json.loads(pg_parser.parse_sql_json(sql))
    except pg_parser.ParseError as e:
        raise NotExplainable(f"does not parse: {e}") from None
    stmts = tree.get("stmts", [])
    if len(stmts) != 1 or next(iter(stmts[0]["stmt"])) not in EXPLAINABLE:
        raise NotExplainable("not a single SELECT, INSERT, UPDATE or DELETE")
    return Statement(sql, _max_param(tree))


def _max_param(node) -> int:
    if isinstance(node, dict):
        own = node["ParamRef"].get("number", 0) if "ParamRef" in node else 0
        return max([own, *(_max_param(v) for v in node.values())])
    if isinstance(node, list):
        return max((_max_param(v) for v in node), default=0)
    return 0


def choose_statement(normalized_sql: str, sample_sql: str | None) -> tuple[Statement, str]:
    """The sample with literals when there is a usable one, else the normalized text; and which it was."""
    if sample_sql:
        try:
            stmt = parse_statement(sample_sql)
            return stmt, ("sample" if stmt.parameters == 0 else "generic")
        except NotExplainable:
            pass
    return parse_statement(normalized_sql), "generic"


def explain(conn: psycopg.Connection, stmt: Statement, name: str) -> dict:
    """The top Plan node of EXPLAIN (FORMAT JSON), planned generically when the statement has $n parameters.

    Runs in a read-only transaction that is rolled back; EXPLAIN without ANALYZE executes nothing.
    """
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET TRANSACTION READ ONLY")
            if stmt.parameters == 0:
                out = conn.execute(f"EXPLAIN (FORMAT JSON) {stmt.sql}").fetchone()[0]
            else:
                # Prepared with untyped parameters, planned generically: the NULLs only fill the slots.
                conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                conn.execute(f"PREPARE {name} AS {stmt.sql}")
                nulls = ", ".join(["NULL"] * stmt.parameters)
                out = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({nulls})").fetchone()[0]
    finally:
        if stmt.parameters:
            _deallocate(conn, name)
    if isinstance(out, str):
        out = json.loads(out)
    return out[0]["Plan"]


def _deallocate(conn: psycopg.Connection, name: str) -> None:
    """Prepared statements outlive a rolled-back transaction: drop ours."""
    if conn.execute("SELECT 1 FROM pg_prepared_statements WHERE name = %s", (name,)).fetchone():
        conn.execute(f"DEALLOCATE {name}")


def summarize(plan: dict) -> dict:
    """Costs, estimated rows, node types (depth first), relations and indexes, and a hash of the plan's shape."""
    node_types, relations, indexes, shape = [], [], [], []

    def walk(node: dict) -> None:
        node_types.append(node["Node Type"])
        rel, idx = node.get("Relation Name"), node.get("Index Name")
        if rel and rel not in relations:
            relations.append(rel)
        if idx and idx not in indexes:
            indexes.append(idx)
        shape.append(f"{node['Node Type']}:{rel or ''}:{idx or ''}:{len(node.get('Plans', []))}")
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return {"startup_cost": plan["Startup Cost"], "total_cost": plan["Total Cost"], "plan_rows": plan["Plan Rows"],
            "plan_width": plan["Plan Width"], "node_types": node_types, "relations": relations, "indexes": indexes,
            "shape_hash": hashlib.md5("|".join(shape).encode()).hexdigest()}


def collect(store: psycopg.Connection, target: Target, result: CollectorResult, *, min_calls: int = 20,
            window_hours: int = 24, max_templates: int = 200, only_target: bool = False) -> None:
    """EXPLAIN each frequent template in the target database and store one plan row per template.

    only_target: the target is the only monitored database, so log events count whatever database
    name the proxy recorded for them.
    """
    if None in store.execute("SELECT to_regclass('pgpilot.templates'), to_regclass('pgpilot.query_events')").fetchone():
        result.notice(f"{target.name}: no pgpilot.templates or pgpilot.query_events in the log store yet; "
                      "no plans collected")
        return
    candidates = store.execute(CANDIDATES_SQL, {
        "window_hours": window_hours, "database": target.name, "any_database": only_target,
        "min_calls": min_calls, "max_templates": max_templates}).fetchall()
    rows = []
    for fp, normalized_sql, sample_sql, calls in candidates:
        try:
            stmt, source = choose_statement(normalized_sql, sample_sql)
            plan = explain(target.conn, stmt, PREPARED_NAME)
        except NotExplainable as e:
            result.notice(f"{target.name}: template {fp} skipped: {e}")
            continue
        except psycopg.errors.UndefinedTable as e:
            result.notice(f"{target.name}: template {fp} skipped, a table it uses no longer exists: {error_text(e)}")
            continue
        except psycopg.Error as e:
            result.notice(f"{target.name}: template {fp} could not be explained: {error_text(e)}")
            continue
        s = summarize(plan)
        rows.append((target.now(), target.name, fp, source, calls,
                     Jsonb(plan), s["startup_cost"], s["total_cost"], s["plan_rows"], s["plan_width"],
                     s["node_types"], s["relations"], s["indexes"], s["shape_hash"]))
    result.wrote("plans", write_rows(store, "plans", PLAN_COLUMNS, rows))
