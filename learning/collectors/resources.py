"""The resources collector: per table and index sizes, cache hit ratios, scans, tuples, unused indexes and bloat."""
from __future__ import annotations

from importlib import resources

import psycopg
from psycopg.rows import dict_row
from psycopg import sql

from learning.collectors.common import CollectorResult, Target, error_text, ratio, write_rows

STATISTICAL_BLOAT_SQL = resources.files("learning.collectors").joinpath("table_bloat.sql").read_text()
# pgstattuple_approx reads every page the visibility map does not mark all-visible: cap what one run may scan.
PGSTATTUPLE_MAX_BYTES = 1 << 30

TABLES_SQL = """
SELECT t.relid, t.schemaname, t.relname, c.relkind,
       pg_total_relation_size(t.relid) AS total_bytes, pg_relation_size(t.relid) AS table_bytes,
       pg_indexes_size(t.relid) AS indexes_bytes,
       CASE WHEN c.reltoastrelid <> 0 THEN pg_total_relation_size(c.reltoastrelid) ELSE 0 END AS toast_bytes,
       t.n_live_tup, t.n_dead_tup, t.seq_scan, t.seq_tup_read, t.idx_scan, t.idx_tup_fetch,
       t.n_tup_ins, t.n_tup_upd, t.n_tup_del, t.n_tup_hot_upd, t.n_mod_since_analyze,
       io.heap_blks_read, io.heap_blks_hit, io.idx_blks_read, io.idx_blks_hit,
       t.last_vacuum, t.last_autovacuum, t.last_analyze, t.last_autoanalyze,
       coalesce((SELECT option_value::int FROM pg_options_to_table(c.reloptions)
                 WHERE option_name = 'fillfactor'), 100) AS fillfactor
FROM pg_stat_user_tables t
JOIN pg_statio_user_tables io ON io.relid = t.relid
JOIN pg_class c ON c.oid = t.relid
"""
TABLE_COLUMNS = (
    "ts", "database", "relid", "schemaname", "relname", "relkind", "total_bytes", "table_bytes", "indexes_bytes",
    "toast_bytes", "n_live_tup", "n_dead_tup", "seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch",
    "n_tup_ins", "n_tup_upd", "n_tup_del", "n_tup_hot_upd", "n_mod_since_analyze", "heap_blks_read",
    "heap_blks_hit", "heap_hit_ratio", "idx_blks_read", "idx_blks_hit", "idx_hit_ratio", "last_vacuum",
    "last_autovacuum", "last_analyze", "last_autoanalyze", "fillfactor", "bloat_percent", "bloat_bytes",
    "bloat_method")

INDEXES_SQL = """
SELECT i.indexrelid, i.relid, i.schemaname, i.relname, i.indexrelname,
       pg_relation_size(i.indexrelid) AS index_bytes, i.idx_scan, i.idx_tup_read, i.idx_tup_fetch,
       io.idx_blks_read, io.idx_blks_hit, x.indisunique AS is_unique, x.indisprimary AS is_primary,
       x.indisvalid AS is_valid,
       x.indisexclusion OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid) AS enforces,
       pg_get_indexdef(i.indexrelid) AS definition
FROM pg_stat_user_indexes i
JOIN pg_statio_user_indexes io ON io.indexrelid = i.indexrelid
JOIN pg_index x ON x.indexrelid = i.indexrelid
"""
INDEX_COLUMNS = ("ts", "database", "indexrelid", "relid", "schemaname", "relname", "indexrelname", "index_bytes",
                 "idx_scan", "idx_tup_read", "idx_tup_fetch", "idx_blks_read", "idx_blks_hit", "hit_ratio",
                 "is_unique", "is_primary", "is_valid", "unused", "definition")


def pgstattuple_schema(target: Target, result: CollectorResult) -> str | None:
    """The schema pgstattuple lives in, creating the extension if we may; None (with a notice) otherwise."""
    find = "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE extname = 'pgstattuple'"
    row = target.conn.execute(find).fetchone()
    if row is None:
        try:
            target.conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        except psycopg.Error as e:
            result.notice(f"{target.name}: pgstattuple is not installed and could not be created ({error_text(e)}); "
                          "table bloat is estimated from statistics instead")
            return None
        row = target.conn.execute(find).fetchone()
    return row[0]


def statistical_bloat(conn: psycopg.Connection) -> dict[int, tuple[float, int]]:
    """relid -> (bloat percent, bloat bytes) estimated from pg_class and pg_stats."""
    return {relid: (pct, nbytes) for relid, pct, nbytes in conn.execute(STATISTICAL_BLOAT_SQL)}


def table_bloat(target: Target, tables: list[dict], result: CollectorResult, method: str = "auto",
                max_scan_bytes: int = PGSTATTUPLE_MAX_BYTES) -> dict[int, tuple[float, int, str]]:
    """relid -> (bloat percent, bloat bytes, method) for heap tables: dead tuples plus free space.

    method "auto" measures with pgstattuple_approx where the extension is usable and the table is at most
    max_scan_bytes, and falls back to the statistical estimate; "statistical" never touches the tables.
    """
    estimates = statistical_bloat(target.conn)
    schema = pgstattuple_schema(target, result) if method in ("auto", "pgstattuple_approx") else None
    approx = None if schema is None else sql.SQL(
        "SELECT dead_tuple_percent + approx_free_percent, dead_tuple_len + approx_free_space::bigint "
        "FROM {}.pgstattuple_approx(%s::oid::regclass)").format(sql.Identifier(schema))
    out: dict[int, tuple[float, int, str]] = {}
    for t in tables:
        if t["relkind"] not in ("r", "m") or t["table_bytes"] is None:
            continue
        if approx is not None and t["table_bytes"] <= max_scan_bytes:
            try:
                pct, nbytes = target.conn.execute(approx, (t["relid"],)).fetchone()
                out[t["relid"]] = (pct, nbytes, "pgstattuple_approx")
                continue
            except psycopg.errors.InsufficientPrivilege as e:
                result.notice(f"{target.name}: pgstattuple_approx refused ({error_text(e)}); grant "
                              "pg_stat_scan_tables to measure bloat, estimating from statistics meanwhile")
                approx = None
            except psycopg.Error:  # dropped or rewritten meanwhile: the estimate will do
                pass
        if t["relid"] in estimates:
            out[t["relid"]] = (*estimates[t["relid"]], "statistical")
    return out


def collect(store: psycopg.Connection, target: Target, result: CollectorResult, *,
            bloat_method: str = "auto") -> None:
    """One row per user table in table_stats and per user index in index_stats."""
    conn = target.conn
    ts = target.now()
    with conn.cursor(row_factory=dict_row) as cur:
        tables = cur.execute(TABLES_SQL).fetchall()
        indexes = cur.execute(INDEXES_SQL).fetchall()
    bloat = table_bloat(target, tables, result, bloat_method)
    for t in tables:
        t.update(ts=ts, database=target.name,
                 heap_hit_ratio=ratio(t["heap_blks_hit"], t["heap_blks_read"]),
                 idx_hit_ratio=ratio(t["idx_blks_hit"], t["idx_blks_read"]))
        t["bloat_percent"], t["bloat_bytes"], t["bloat_method"] = bloat.get(t["relid"], (None, None, None))
    for i in indexes:
        i.update(ts=ts, database=target.name, hit_ratio=ratio(i["idx_blks_hit"], i["idx_blks_read"]),
                 unused=i["idx_scan"] == 0 and not (i["is_unique"] or i["is_primary"] or i["enforces"]))
    with store.transaction():
        result.wrote("table_stats", write_rows(store, "table_stats", TABLE_COLUMNS,
                                               ([t[c] for c in TABLE_COLUMNS] for t in tables)))
        result.wrote("index_stats", write_rows(store, "index_stats", INDEX_COLUMNS,
                                               ([i[c] for c in INDEX_COLUMNS] for i in indexes)))
