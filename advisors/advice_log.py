"""The advice log: every piece of advice given (pgpilot.advice_log) and, on later runs, what became of it.

Each `pgpilot advise` run records its advice, then checks the advice of earlier runs
(pgpilot.advice_checks): does the advised index exist now (or is the advised drop done), how often has it
been scanned (pg_stat_user_indexes.idx_scan), and what do the templates it targeted cost now compared with
the estimate made when it was advised. Tables live in the log store beside the query log.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass

from pglast import parse_sql
from pglast.stream import RawStream

from advisors.catalog import Catalog, Index

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS pgpilot;
CREATE TABLE IF NOT EXISTS pgpilot.advice_log (
    id              bigserial PRIMARY KEY,
    run_id          text        NOT NULL,        -- one advise run
    advised_at      timestamptz NOT NULL DEFAULT now(),
    database        text        NOT NULL,
    kind            text        NOT NULL,        -- create_index | drop_index | partition
    table_name      text        NOT NULL,        -- schema.table
    object_name     text,                        -- the index advised (or to drop)
    signature       text        NOT NULL,        -- table, key columns, INCLUDE and predicate: matches the index later
    ddl             text        NOT NULL,
    estimated_bytes bigint,
    benefit         double precision,            -- estimated workload cost saved over the window
    confidence      real,
    reason          text,
    templates       jsonb       NOT NULL DEFAULT '[]'  -- [{fingerprint, calls, cost_before, cost_after}]
);
CREATE INDEX IF NOT EXISTS advice_log_database_signature ON pgpilot.advice_log (database, signature, id);
CREATE TABLE IF NOT EXISTS pgpilot.advice_checks (
    advice_id     bigint      NOT NULL REFERENCES pgpilot.advice_log (id) ON DELETE CASCADE,
    checked_at    timestamptz NOT NULL DEFAULT now(),
    applied       boolean     NOT NULL,          -- create: a matching valid index exists; drop: the index is gone
    index_name    text,
    idx_scan      bigint,
    index_bytes   bigint,
    cost_ratio    double precision,              -- targeted templates now / before the advice (calls-weighted)
    expected_ratio double precision,             -- what the advice estimated
    outcome       text        NOT NULL,
    templates     jsonb       NOT NULL DEFAULT '[]'  -- [{fingerprint, cost_before, cost_after, cost_now}]
);
CREATE INDEX IF NOT EXISTS advice_checks_advice ON pgpilot.advice_checks (advice_id, checked_at);
"""


def ensure_schema(conn) -> None:
    conn.execute(SCHEMA_SQL)


def canonical_predicate(predicate: str | None) -> str:
    """A WHERE clause as pglast prints it, so `(a IS NULL)` and `a IS NULL` compare equal."""
    if not predicate:
        return ""
    try:
        stmt = parse_sql(f"SELECT 1 WHERE {predicate}")[0].stmt
        return RawStream()(stmt.whereClause)
    except Exception:
        return " ".join(predicate.split())


def signature(table: str, columns, include=(), predicate: str | None = None) -> str:
    sig = f"{table}({','.join(columns)})"
    if include:
        sig += f" INCLUDE ({','.join(sorted(include))})"
    pred = canonical_predicate(predicate)
    if pred:
        sig += f" WHERE {pred}"
    return sig


def index_signature(idx: Index) -> str:
    return signature(idx.table, idx.columns, idx.include, idx.predicate)


@dataclass
class AdviceCheck:
    advice_id: int
    advised_at: str
    kind: str
    object_name: str | None
    signature: str
    applied: bool
    index_name: str | None
    idx_scan: int | None
    index_bytes: int | None
    cost_ratio: float | None
    expected_ratio: float | None
    outcome: str

    def to_dict(self) -> dict:
        return asdict(self)


def record_index_advice(conn, advice, run_id: str | None = None) -> str:
    """Store every recommendation of an IndexAdvice; returns the run id."""
    ensure_schema(conn)
    run_id = run_id or uuid.uuid4().hex[:12]
    with conn.cursor() as cur:
        for r in advice.recommendations:
            if r.action == "create":
                sig = signature(r.spec.table, r.spec.columns, r.spec.include, r.spec.where)
            else:  # a drop is matched by name: the index either still exists or not
                sig = f"{r.table}:{r.index_name}"
            cur.execute(
                """INSERT INTO pgpilot.advice_log (run_id, database, kind, table_name, object_name, signature, ddl,
                                                   estimated_bytes, benefit, confidence, reason, templates)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (run_id, advice.database, f"{r.action}_index", r.table, r.index_name, sig, r.ddl, r.size_bytes,
                 r.benefit, r.confidence, r.reason,
                 json.dumps([{"fingerprint": e.fingerprint, "calls": e.calls, "cost_before": e.cost_before,
                              "cost_after": e.cost_after} for e in r.templates])))
    return run_id


def check_earlier_advice(conn, catalog: Catalog, current_costs: dict[str, float], *,
                         exclude_run: str | None = None, record: bool = True,
                         max_age_days: float = 90.0) -> list[AdviceCheck]:
    """Compare the latest advice per index with what the database looks like now; record the checks.

    `current_costs` maps template fingerprints to their estimated cost with the indexes that exist now.
    """
    ensure_schema(conn)
    rows = conn.execute(
        """SELECT DISTINCT ON (signature, kind) id, advised_at, kind, table_name, object_name, signature, templates
           FROM pgpilot.advice_log
           WHERE database = %s AND kind IN ('create_index', 'drop_index') AND run_id IS DISTINCT FROM %s
             AND advised_at >= now() - make_interval(days => %s)
           ORDER BY signature, kind, id DESC""", (catalog.database, exclude_run, int(max_age_days))).fetchall()
    by_sig: dict[str, Index] = {}
    by_name: dict[str, Index] = {}
    for t in catalog.tables.values():
        for idx in t.indexes:
            if idx.is_valid:
                by_sig.setdefault(index_signature(idx), idx)
            by_name[f"{t.qualified}:{idx.name}"] = idx
    checks = []
    for advice_id, advised_at, kind, table, name, sig, templates in rows:
        weights = [(tp, current_costs.get(tp["fingerprint"])) for tp in templates]
        known = [(tp, now) for tp, now in weights if now is not None]
        before = sum(tp["calls"] * tp["cost_before"] for tp, _ in known)
        cost_ratio = sum(tp["calls"] * now for tp, now in known) / before if before > 0 else None
        expected = sum(tp["calls"] * tp["cost_after"] for tp, _ in known) / before if before > 0 else None
        if kind == "create_index":
            idx = by_sig.get(sig)
            applied = idx is not None
            if not applied:
                outcome = "not applied"
            elif not idx.idx_scan:
                outcome = "applied, not used yet"
            elif cost_ratio is not None and expected is not None and cost_ratio <= expected + 0.1 * (1 - expected):
                outcome = "applied, helping as estimated"
            elif cost_ratio is not None and cost_ratio < 0.95:
                outcome = "applied, helping less than estimated"
            else:
                outcome = "applied, used, no estimated gain"
        else:
            idx = by_name.get(f"{table}:{name}")
            applied = idx is None
            outcome = "applied" if applied else "not applied"
        check = AdviceCheck(advice_id, advised_at.isoformat(timespec="seconds"), kind, name, sig, applied,
                            idx.name if idx is not None else None, idx.idx_scan if idx is not None else None,
                            idx.size_bytes if idx is not None else None, cost_ratio, expected, outcome)
        checks.append(check)
        if record:
            conn.execute(
                """INSERT INTO pgpilot.advice_checks (advice_id, applied, index_name, idx_scan, index_bytes,
                                                      cost_ratio, expected_ratio, outcome, templates)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (advice_id, applied, check.index_name, check.idx_scan, check.index_bytes, cost_ratio, expected,
                 outcome, json.dumps([{**tp, "cost_now": now} for tp, now in weights])))
    return checks
