"""The logged workload as the advisors see it: templates, how often each ran, and instances to plan.

The query log (pgpilot.templates + pgpilot.query_events) is the source; when it is empty, the
statements collector's snapshots (pgpilot.statement_texts + statement_deltas) and then the server's own
pg_stat_statements stand in. Templates hold $n placeholders, so each one gets a few instances to EXPLAIN,
best first: logged parameter values (query_log.parameters on), the logged sample_sql, values synthesized
from the column statistics (pg_stats) the parameters are compared with, and last a generic plan.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import random
import re
from dataclasses import dataclass, field

from pglast.parser import fingerprint as pg_fingerprint
from pglast.parser import scan

from advisors.catalog import Catalog, quote_literal
from advisors.predicates import QueryShape, analyze

log = logging.getLogger("pgpilot.advisors")

WRITE_KINDS = ("insert", "update", "delete", "merge", "copy")
_NUMERIC_TYPES = ("smallint", "integer", "bigint", "numeric", "real", "double precision", "oid")
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Instance:
    """Something to EXPLAIN for a template: the normalized text plus values for its $n, or a generic plan."""
    sql: str                                   # normalized text with $n (literal SQL for sample/literal instances)
    params: tuple[str | None, ...] | None      # values for $1..$n; None: plan `sql` as it is (literal or generic)
    source: str                                # logged | sample | synthesized | generic
    tables: frozenset[str]                     # qualified tables the statement touches
    param_columns: dict[int, str] = field(default_factory=dict)  # $n -> type of the column it is compared with

    @property
    def key(self) -> str:
        h = hashlib.sha1(self.sql.encode())
        h.update(repr(self.params).encode())
        return h.hexdigest()[:20]


@dataclass
class Template:
    fingerprint: str
    normalized_sql: str
    kind: str
    calls: float
    total_us: float
    rows_written: float
    shape: QueryShape
    instances: list[Instance] = field(default_factory=list)
    logged_params: list[tuple[str | None, ...]] = field(default_factory=list)  # recent logged values
    synthesized: list[Instance] = field(default_factory=list)  # drawn from pg_stats, when nothing was logged

    @property
    def label(self) -> str:
        text = " ".join(self.normalized_sql.split())
        return text if len(text) <= 90 else text[:87] + "..."

    @property
    def tables(self) -> set[str]:
        return self.shape.tables


@dataclass
class Workload:
    templates: list[Template]
    source: str                               # query_log | statement_snapshots | pg_stat_statements
    window_start: dt.datetime | None
    window_end: dt.datetime | None
    write_rows: dict[str, dict[str, float]]   # table -> {insert|update|delete: rows in the window}
    updated_columns: dict[str, set[str]]      # table -> columns UPDATE statements set
    notes: list[str] = field(default_factory=list)

    @property
    def total_calls(self) -> float:
        return sum(t.calls for t in self.templates)

    def reads(self) -> list[Template]:
        return [t for t in self.templates if t.instances]


def _table_exists(conn, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def load_workload(log_conn, catalog: Catalog, *, database: str | None = None,
                  window: dt.timedelta = dt.timedelta(days=7), instances_per_template: int = 5,
                  min_calls: int = 1, synthesize: bool = False, seed: int = 0,
                  target_conn=None) -> Workload:
    """Read the workload of `database` (default: the catalog's) over the last `window` from the log store."""
    database = database or catalog.database
    notes: list[str] = []
    rows = []
    source = "query_log"
    start = end = None
    if _table_exists(log_conn, "pgpilot.templates") and _table_exists(log_conn, "pgpilot.query_events"):
        start, end = log_conn.execute(
            "SELECT min(ts), max(ts) FROM pgpilot.query_events WHERE ts >= now() - %s AND database = %s",
            (window, database)).fetchone()
        rows = log_conn.execute(
            """SELECT t.fingerprint, t.normalized_sql, t.kind, t.sample_sql, e.calls, e.total_us, e.rows
               FROM pgpilot.templates t JOIN (
                 SELECT fingerprint, count(*) AS calls, sum(duration_us) AS total_us, sum(rows) AS rows
                 FROM pgpilot.query_events
                 WHERE ts >= now() - %s AND database = %s AND sqlstate IS NULL
                 GROUP BY fingerprint HAVING count(*) >= %s) e USING (fingerprint)
               ORDER BY e.calls DESC, t.fingerprint""", (window, database, min_calls)).fetchall()
    if not rows and _table_exists(log_conn, "pgpilot.statement_deltas"):
        source = "statement_snapshots"
        rows = log_conn.execute(
            """SELECT d.fingerprint, min(x.query), NULL, NULL, sum(d.calls), sum(d.total_exec_time) * 1000,
                      sum(d.rows)
               FROM pgpilot.statement_deltas d JOIN pgpilot.statement_texts x USING (database, queryid)
               WHERE d.database = %s AND d.ts >= now() - %s AND d.fingerprint IS NOT NULL
               GROUP BY d.fingerprint HAVING sum(d.calls) >= %s ORDER BY 5 DESC""",
            (database, window, min_calls)).fetchall()
    if not rows and target_conn is not None:
        has_pgss = target_conn.execute(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()[0]
        if has_pgss:
            source = "pg_stat_statements"
            found = target_conn.execute(
                """SELECT query, calls, total_exec_time * 1000, rows FROM pg_stat_statements
                   WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND calls >= %s AND query !~* 'hypopg|pg_stat_statements|pgpilot'""",
                (min_calls,)).fetchall()
            merged: dict[str, list] = {}
            for query, calls, total_us, nrows in found:
                try:
                    fp = pg_fingerprint(query)
                except Exception:
                    continue
                entry = merged.setdefault(fp, [fp, query, None, None, 0, 0.0, 0])
                entry[4] += calls
                entry[5] += total_us
                entry[6] += nrows
            rows = sorted(merged.values(), key=lambda r: -r[4])
    if not rows:
        notes.append("no logged workload found (query log, collector snapshots, pg_stat_statements)")
        return Workload([], "none", start, end, {}, {}, notes)

    params_by_fp: dict[str, list[tuple]] = {}
    if source == "query_log":
        for fp, params in log_conn.execute(
                """SELECT fingerprint, parameters FROM (
                     SELECT fingerprint, parameters,
                            row_number() OVER (PARTITION BY fingerprint ORDER BY ts DESC) AS n
                     FROM pgpilot.query_events
                     WHERE ts >= now() - %s AND database = %s AND parameters IS NOT NULL
                       AND sqlstate IS NULL) x
                   WHERE n <= 200""", (window, database)):
            params_by_fp.setdefault(fp, []).append(tuple(params))

    rng = random.Random(seed)
    templates: list[Template] = []
    write_rows: dict[str, dict[str, float]] = {}
    updated: dict[str, set[str]] = {}
    for fp, normalized, kind, sample_sql, calls, total_us, nrows in rows:
        shape = analyze(normalized, catalog)
        if shape is None:
            continue
        kind = shape.kind
        if shape.written_table is not None and kind in WRITE_KINDS:
            per = write_rows.setdefault(shape.written_table.qualified, {})
            per[kind] = per.get(kind, 0.0) + float(nrows or 0)
            if kind == "update":
                updated.setdefault(shape.written_table.qualified, set()).update(shape.updated_columns)
        if not shape.accesses:
            continue
        t = Template(fp, normalized, kind, float(calls), float(total_us or 0), float(nrows or 0), shape,
                     logged_params=params_by_fp.get(fp, []))
        t.instances = make_instances(t, catalog, sample_sql, instances_per_template, synthesize, rng)
        templates.append(t)
    for table, kinds in writes_from_snapshots(log_conn, database, window).items():
        per = write_rows.setdefault(table, {})
        for kind, rows_ in kinds.items():  # writes that bypassed the proxy show up in the table counters
            per[kind] = max(per.get(kind, 0.0), rows_)
    if any(t.instances and t.instances[0].source == "generic" for t in templates):
        notes.append("some templates have no logged values: they are planned as generic plans "
                     "(turn query_log.parameters on for sharper estimates)")
    return Workload(templates, source, start, end, write_rows, updated, notes)


def writes_from_snapshots(log_conn, database: str, window: dt.timedelta) -> dict[str, dict[str, float]]:
    """Rows inserted, updated and deleted per table over the window, from the collectors' table_stats."""
    if not _table_exists(log_conn, "pgpilot.table_stats"):
        return {}
    out: dict[str, dict[str, float]] = {}
    for schema, name, ins, upd, dele in log_conn.execute(
            """SELECT schemaname, relname,
                      max(n_tup_ins) - min(n_tup_ins), max(n_tup_upd) - min(n_tup_upd), max(n_tup_del) - min(n_tup_del)
               FROM pgpilot.table_stats WHERE database = %s AND ts >= now() - %s
               GROUP BY schemaname, relname HAVING count(*) >= 2""", (database, window)):
        out[f"{schema}.{name}"] = {"insert": float(ins or 0), "update": float(upd or 0), "delete": float(dele or 0)}
    return out


def param_column_types(shape: QueryShape, catalog: Catalog) -> dict[int, str]:
    out = {}
    for n, (table, col, _op) in shape.params.items():
        t = catalog.tables.get(table)
        if t is not None and col in t.columns:
            out[n] = t.columns[col].type
    return out


def make_instances(t: Template, catalog: Catalog, sample_sql: str | None, limit: int, synthesize: bool,
                   rng: random.Random) -> list[Instance]:
    """The template's instances, best source first; fills t.synthesized as well when nothing was logged."""
    tables = frozenset(t.shape.tables)
    types = param_column_types(t.shape, catalog)
    nparams = max_param(t.normalized_sql)
    out: list[Instance] = []
    seen: set[tuple] = set()
    for values in t.logged_params:
        if values in seen or len(values) < nparams:
            continue
        seen.add(values)
        out.append(Instance(t.normalized_sql, values, "logged", tables, types))
        if len(out) >= limit:
            return out
    if out:
        return out
    if sample_sql:
        return [Instance(sample_sql, None, "sample", tables, types)]
    if nparams == 0:
        return [Instance(t.normalized_sql, None, "literal", tables, types)]
    for _ in range(min(limit, 3)):
        values = synthesize_values(t.shape, catalog, nparams, rng)
        if values is None:
            break
        t.synthesized.append(Instance(t.normalized_sql, values, "synthesized", tables, types))
    if synthesize and t.synthesized:
        return list(t.synthesized)
    return [Instance(t.normalized_sql, None, "generic", tables, types)]


def max_param(sql: str) -> int:
    """The highest $n in a text (0 when it has none)."""
    try:
        tokens = scan(sql)
    except Exception:
        return 0
    raw = sql.encode()
    highest = 0
    for tok in tokens:
        if tok.name == "PARAM":
            highest = max(highest, int(raw[tok.start + 1:tok.end + 1]))
    return highest


def synthesize_values(shape: QueryShape, catalog: Catalog, nparams: int,
                      rng: random.Random) -> tuple[str | None, ...] | None:
    """Values for the $n compared with a column, drawn from that column's statistics (None: no such $n).

    Equality draws a most-common value (by frequency) or a histogram bound; a pair of bounds on one column
    becomes a window of about 1/20 of its histogram; a lone bound sits at a random quantile; LIMIT gets 10.
    A $n tied to no column (select-list arithmetic, CASE results, LIKE patterns) stays None: the planner gets
    a neutral value of its type (advisors.whatif). Without any value to draw, the answer is None.
    """
    values: dict[int, str | None] = {n: "10" for n in shape.limit_params}  # a typical page size
    bounds: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for n, (table, col, op) in shape.params.items():
        column = catalog.tables[table].columns.get(col)
        if column is None:
            continue
        if op in ("=", "in", "expr"):
            values[n] = _draw_equal(column, rng)
        elif op in ("<", "<=", ">", ">="):
            bounds.setdefault((table, col), []).append((n, op))
    for (table, col), items in bounds.items():
        hist = catalog.tables[table].columns[col].histogram_bounds
        if not hist:
            continue
        lows = [n for n, op in items if op in (">", ">=")]
        highs = [n for n, op in items if op in ("<", "<=")]
        width = max(1, len(hist) // 20)
        i = rng.randrange(0, max(1, len(hist) - width))
        for n in lows:
            values[n] = hist[i]
        for n in highs:
            values[n] = hist[min(len(hist) - 1, i + width)] if lows else hist[i]
    if not any(values.get(n) is not None for n in range(1, nparams + 1) if n not in shape.limit_params):
        return None
    return tuple(values.get(i) for i in range(1, nparams + 1))


def _draw_equal(column, rng: random.Random) -> str | None:
    mcv, freqs = column.most_common_vals, column.most_common_freqs
    if mcv and freqs and (not column.histogram_bounds or rng.random() < sum(freqs)):
        return rng.choices(mcv, weights=freqs)[0]
    if column.histogram_bounds:
        return rng.choice(column.histogram_bounds)
    return None


def render_literal(sql: str, params: tuple[str | None, ...], param_types: dict[int, str],
                   quote_all: bool = False) -> str:
    """The normalized text with each $n replaced by its value as a literal.

    Numbers compared with numeric columns (or with nothing known) are written bare, everything else quoted,
    so `col = '42'` and `case when ... then 1` both come back as the application wrote them.
    """
    raw = sql.encode()
    out: list[bytes] = []
    pos = 0
    for tok in scan(sql):
        if tok.name != "PARAM":
            continue
        n = int(raw[tok.start + 1:tok.end + 1])
        value = params[n - 1] if n - 1 < len(params) else None
        if value is None:
            lit = "NULL"
        else:
            typ = param_types.get(n)
            numeric_col = typ is None or typ.startswith(_NUMERIC_TYPES)
            lit = value if (not quote_all and numeric_col and _NUMBER.match(value)) else quote_literal(value)
            if lit.startswith("-"):  # after a binary minus, "--5" would start a comment
                lit = f"({lit})"
        out.append(raw[pos:tok.start])
        out.append(lit.encode())
        pos = tok.end + 1
    out.append(raw[pos:])
    return b"".join(out).decode()
