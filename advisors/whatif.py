"""Estimated costs of statements under hypothetical index configurations, with HypoPG.

One WhatIf owns one connection to the target database. It keeps the session's hypothetical indexes equal to
the configuration being asked about (creating and dropping only the difference), can hide real indexes
(hypopg_hide_index), and caches every answer by (instance, relevant indexes). Nothing it does is visible to
other sessions: hypothetical indexes live in this backend's memory only.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field

from advisors.catalog import Catalog, quote_ident
from advisors.workload import Instance, render_literal

log = logging.getLogger("pgpilot.advisors")

_HYPO_NAME = re.compile(r"^<(\d+)>")
# Key types whose B-tree equality is bitwise, so PostgreSQL deduplicates them (pg_opclass "equalimage").
_DEDUP_TYPES = ("smallint", "integer", "bigint", "date", "timestamp", "time", "text", "character varying",
                "boolean", "uuid", "oid")
_POSTING_LIST_TIDS = 400   # row pointers one posting list tuple holds at most (about a third of a page)


@dataclass(frozen=True)
class IndexSpec:
    """A B-tree index that could exist: key columns, INCLUDE columns, an optional partial predicate."""
    table: str                            # qualified name, catalog key
    columns: tuple[str, ...]
    include: tuple[str, ...] = ()
    where: str | None = None
    table_sql: str = field(default="", compare=False)

    def column_list(self) -> str:
        return ", ".join(quote_ident(c) for c in self.columns)

    def body(self) -> str:
        """Everything after the index name: ON table USING btree (...) INCLUDE (...) WHERE ..."""
        sql = f"ON {self.table_sql or self.table} USING btree ({self.column_list()})"
        if self.include:
            sql += " INCLUDE (" + ", ".join(quote_ident(c) for c in self.include) + ")"
        if self.where:
            sql += f" WHERE {self.where}"
        return sql

    def create_sql(self, name: str | None = None, concurrently: bool = True) -> str:
        head = "CREATE INDEX CONCURRENTLY" if concurrently else "CREATE INDEX"
        return f"{head} {quote_ident(name)} {self.body()}" if name else f"{head} {self.body()}"

    def describe(self) -> str:
        text = f"{self.table}({', '.join(self.columns)})"
        if self.include:
            text += f" INCLUDE ({', '.join(self.include)})"
        if self.where:
            text += f" WHERE {self.where}"
        return text

    def default_name(self) -> str:
        base = self.table.rsplit(".", 1)[-1] + "_" + "_".join(self.columns)
        if self.include:
            base += "_incl"
        if self.where:
            base += "_part"
        base = re.sub(r"[^a-z0-9_]", "_", base.lower())
        if len(base) > 59:
            import hashlib
            base = base[:50] + "_" + hashlib.sha1(base.encode()).hexdigest()[:8]
        return base + "_idx"


class WhatIf:
    """Plans statements on `conn` with a chosen set of hypothetical indexes (and hidden real ones)."""

    def __init__(self, conn, catalog: Catalog, statement_timeout_ms: int = 30_000):
        self.conn = conn
        self.catalog = catalog
        self._hypo: dict[IndexSpec, int] = {}
        self._hidden: set[int] = set()
        self._costs: dict[tuple, float | None] = {}
        self._sizes: dict[IndexSpec, int] = {}
        self._forms: dict[str, tuple | None] = {}
        self._distinct: dict[tuple, float] = {}
        self.explains = 0
        # psycopg prepares repeated statements itself; ours must be the only prepared statements here.
        conn.prepare_threshold = None
        exists = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'hypopg'").fetchone()[0]
        if not exists:
            log.info("creating extension hypopg (hypothetical indexes; no data, no table locks)")
            conn.execute("CREATE EXTENSION IF NOT EXISTS hypopg")
        conn.execute("SELECT hypopg_reset()")
        self.can_hide = bool(conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname = 'hypopg_hide_index'").fetchone()[0])
        conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
        # Plans are compared with and without indexes: parallel plans add noise, not information.
        conn.execute("SET max_parallel_workers_per_gather = 0")

    # -- configurations ------------------------------------------------------------------------------------
    def _apply(self, config: frozenset[IndexSpec], hidden: frozenset[int]) -> None:
        for spec in [s for s in self._hypo if s not in config]:
            self.conn.execute("SELECT hypopg_drop_index(%s)", (self._hypo.pop(spec),))
        for spec in config:
            if spec not in self._hypo:
                self._hypo[spec] = self._create(spec)
        if self.can_hide:
            for oid in self._hidden - hidden:
                self.conn.execute("SELECT hypopg_unhide_index(%s)", (oid,))
            for oid in hidden - self._hidden:
                self.conn.execute("SELECT hypopg_hide_index(%s)", (oid,))
            self._hidden = set(hidden)

    def _create(self, spec: IndexSpec) -> int:
        row = self.conn.execute("SELECT indexrelid FROM hypopg_create_index(%s)",
                                (spec.create_sql(concurrently=False),)).fetchone()
        return row[0]

    def size(self, spec: IndexSpec) -> int:
        """The index's size in bytes: HypoPG's estimate, shrunk for B-tree deduplication where it applies."""
        if spec not in self._sizes:
            if spec in self._hypo:
                raw = self.conn.execute("SELECT hypopg_relation_size(%s)", (self._hypo[spec],)).fetchone()[0]
            else:
                oid = self._create(spec)
                raw = self.conn.execute("SELECT hypopg_relation_size(%s)", (oid,)).fetchone()[0]
                self.conn.execute("SELECT hypopg_drop_index(%s)", (oid,))
            self._sizes[spec] = int(raw * self._dedup_factor(spec, raw))
        return self._sizes[spec]

    def _dedup_factor(self, spec: IndexSpec, raw_bytes: int) -> float:
        """What deduplication (PostgreSQL 13+) leaves of a B-tree: one key per run of equal keys, 6 bytes per row.

        HypoPG sizes every row as a full tuple. PostgreSQL stores equal keys once with a list of row pointers,
        but only without INCLUDE columns and for types whose equality is bitwise (not numeric, char(n), float).
        """
        table = self.catalog.tables.get(spec.table)
        if spec.include or spec.where or table is None or table.rows < 1000:
            return 1.0
        types = [table.columns[c].type for c in spec.columns if c in table.columns]
        if len(types) != len(spec.columns) or not all(t.startswith(_DEDUP_TYPES) for t in types):
            return 1.0
        distinct = self._distinct_keys(table, spec.columns)
        dups = table.rows / max(distinct, 1.0)
        if dups < 1.5:
            return 1.0
        per_row = raw_bytes / table.rows
        lists = math.ceil(dups / _POSTING_LIST_TIDS)
        per_key = lists * per_row + (dups - lists) * 6
        return min(1.0, per_key / (dups * per_row))

    def _distinct_keys(self, table, columns: tuple[str, ...]) -> float:
        """Distinct values of a key: pg_stats for one column, a sampled estimate for several (as ANALYZE does)."""
        if len(columns) == 1:
            col = table.columns[columns[0]]
            return col.n_distinct or table.rows
        key = (table.qualified, columns)
        if key not in self._distinct:
            percent = min(100.0, 100.0 * 30_000 / max(table.rows, 1.0))
            cols = ", ".join(quote_ident(c) for c in columns)
            n, groups, once = self.conn.execute(
                f"""SELECT coalesce(sum(k), 0), count(*), count(*) FILTER (WHERE k = 1) FROM (
                      SELECT count(*) AS k FROM {table.sql_name} TABLESAMPLE SYSTEM ({percent:.4f}) REPEATABLE (7)
                      GROUP BY {cols}) g""").fetchone()
            n, groups, once, rows = float(n), float(groups), float(once), table.rows
            if n == 0:
                estimate = rows
            elif once == n:  # every sampled key was unique
                estimate = rows
            else:  # Haas and Stokes' Duj1 estimator, as ANALYZE uses for n_distinct
                estimate = n * groups / (n - once + once * n / rows)
            self._distinct[key] = min(rows, max(estimate, float(groups)))
        return self._distinct[key]

    def spec_of(self, index_name: str) -> IndexSpec | None:
        m = _HYPO_NAME.match(index_name)
        if not m:
            return None
        oid = int(m.group(1))
        for spec, o in self._hypo.items():
            if o == oid:
                return spec
        return None

    # -- planning ------------------------------------------------------------------------------------------
    def relevant(self, inst: Instance, config) -> frozenset[IndexSpec]:
        return frozenset(s for s in config if s.table in inst.tables)

    def cost(self, inst: Instance, config=frozenset(), hidden=frozenset()) -> float | None:
        """Total estimated cost of `inst` with `config` hypothetical and `hidden` real indexes hidden."""
        rel = self.relevant(inst, config)
        hid = frozenset(hidden)
        key = (inst.key, rel, hid)
        if key not in self._costs:
            plan = self.plan(inst, rel, hid)
            self._costs[key] = plan["Total Cost"] if plan is not None else None
        return self._costs[key]

    def plan(self, inst: Instance, config=frozenset(), hidden=frozenset()) -> dict | None:
        """The top plan node (EXPLAIN FORMAT JSON) of `inst` under a configuration, or None if it cannot plan."""
        self._apply(self.relevant(inst, config), frozenset(hidden))
        form = self._form(inst)
        if form is None:
            return None
        try:
            return self._explain(form)
        except Exception as e:  # a statement that planned once may still time out
            log.debug("explain failed: %s", e)
            self._rollback()
            return None

    def used_indexes(self, plan: dict) -> list[str]:
        return plan_values(plan, "Index Name")

    def _form(self, inst: Instance) -> tuple | None:
        """How to EXPLAIN an instance, found once by trying the candidate renderings in order."""
        if inst.key in self._forms:
            return self._forms[inst.key]
        attempts: list[tuple] = []
        if inst.params is None and inst.source != "generic":
            attempts.append(("sql", inst.sql))
        elif inst.params is not None and None in inst.params:
            # Some $n have no value: a NULL could fold a filter to false, so they get a neutral one of their type.
            attempts.append(("custom", inst.sql, (), inst.params))
            attempts.append(("custom", inst.sql, self._types(inst), inst.params))
        elif inst.params is not None:
            attempts.append(("sql", render_literal(inst.sql, inst.params, inst.param_columns)))
            attempts.append(("sql", render_literal(inst.sql, inst.params, {}, quote_all=True)))
            attempts.append(("custom", inst.sql, self._types(inst), inst.params))
        else:
            attempts.append(("generic", inst.sql, ()))
            attempts.append(("generic", inst.sql, self._types(inst)))
        form = None
        for attempt in attempts:
            try:
                self._explain(attempt)
                form = attempt
                break
            except Exception as e:
                log.debug("cannot plan %s as %s: %s", inst.sql[:60], attempt[0], e)
                self._rollback()
        if form is None:
            log.info("cannot plan template: %s", " ".join(inst.sql.split())[:100])
        self._forms[inst.key] = form
        return form

    def _types(self, inst: Instance) -> tuple[str, ...]:
        """PREPARE parameter types: the compared column's type where known, else numeric."""
        from advisors.workload import max_param
        n = max_param(inst.sql)
        return tuple(inst.param_columns.get(i, "numeric") for i in range(1, n + 1))

    def _rollback(self) -> None:
        """Leave no half-made prepared statement behind after a failed attempt."""
        try:
            self.conn.execute("DEALLOCATE pgpilot_whatif")
        except Exception:
            pass
        try:
            self.conn.execute("RESET plan_cache_mode")
        except Exception:
            pass

    def _explain(self, form: tuple) -> dict:
        self.explains += 1
        if form[0] == "sql":
            row = self.conn.execute("EXPLAIN (FORMAT JSON) " + form[1]).fetchone()
            return _top(row[0])
        kind, sql, types = form[0], form[1], form[2]
        type_list = f"({', '.join(types)})" if types else ""
        self.conn.execute(f"PREPARE pgpilot_whatif{type_list} AS {sql}")
        try:
            prepared = self.conn.execute(
                "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = 'pgpilot_whatif'"
            ).fetchone()[0]
            nparams = len(prepared)
            if kind == "generic":
                self.conn.execute("SET plan_cache_mode = force_generic_plan")
                args = ", ".join(["NULL"] * nparams)
            else:
                self.conn.execute("SET plan_cache_mode = force_custom_plan")
                values = list(form[3]) + [None] * max(0, nparams - len(form[3]))
                values = [v if v is not None else _neutral(t) for v, t in zip(values, prepared)]
                args = ", ".join("NULL" if v is None else "'" + v.replace("'", "''") + "'" for v in values)
            row = self.conn.execute(
                f"EXPLAIN (FORMAT JSON) EXECUTE pgpilot_whatif{'(' + args + ')' if nparams else ''}").fetchone()
            return _top(row[0])
        finally:
            self._rollback()

    def close(self) -> None:
        """Forget every hypothetical index and give the connection its settings back."""
        try:
            self._apply(frozenset(), frozenset())
            self.conn.execute("SELECT hypopg_reset()")
            self.conn.execute("RESET statement_timeout")
            self.conn.execute("RESET max_parallel_workers_per_gather")
        except Exception:
            pass


def _neutral(type_name: str) -> str | None:
    """A harmless value of a type, for a parameter nothing tells the value of."""
    if type_name.startswith(("smallint", "integer", "bigint", "numeric", "real", "double", "oid")):
        return "1"
    if type_name.startswith(("text", "character", "name")):
        return "a"
    if type_name.startswith("date"):
        return "2000-01-01"
    if type_name.startswith("timestamp"):
        return "2000-01-01 00:00:00"
    if type_name.startswith("interval"):
        return "1 day"
    if type_name == "boolean":
        return "true"
    return None


def _top(explain_json) -> dict:
    data = explain_json if isinstance(explain_json, list) else json.loads(explain_json)
    return data[0]["Plan"]


def plan_values(plan, key: str) -> list:
    """Every value of `key` in an EXPLAIN (FORMAT JSON) plan tree, in depth-first order."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if key in node:
                found.append(node[key])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(plan)
    return found
