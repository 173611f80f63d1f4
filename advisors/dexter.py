"""A Dexter-style index advisor, reimplemented from its documented algorithm, as the baseline to beat.

Dexter (github.com/ankane/dexter) works one query at a time, with no budget and no workload weights:
pass 0 plans each query as is; pass 1 plans it with a hypothetical single-column index on every column
the workload's queries mention; pass 2 adds every ordered pair of those columns as two-column indexes.
A query keeps the hypothetical indexes its cheapest plan used when that plan is at least `min_savings`
cheaper (pass 1 against pass 0, pass 2 against pass 1, the latter only above cost 100); when a plan uses
several new indexes, the single best of them alone must still meet the bar. Queries cheaper than 100 are
skipped. The suggestion is the union over queries, minus single-column indexes that lead a suggested
two-column one, minus indexes whose first one or two columns an existing B-tree index already has.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pglast import ast, parse_sql

from advisors.catalog import Catalog
from advisors.whatif import IndexSpec, WhatIf
from advisors.workload import Template, Workload


@dataclass
class DexterResult:
    indexes: list[IndexSpec]
    savings: dict[IndexSpec, float] = field(default_factory=dict)   # calls x cost saved by the queries it serves
    per_query: dict[str, dict] = field(default_factory=dict)


def _column_names(sql: str) -> set[str]:
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, ast.ColumnRef):
            last = node.fields[-1]
            if isinstance(last, ast.String):
                names.add(last.sval)
            return
        if isinstance(node, ast.Node):
            for attr in node:
                walk(getattr(node, attr))
        elif isinstance(node, tuple):
            for item in node:
                walk(item)

    try:
        walk(parse_sql(sql))
    except Exception:
        pass
    return names


def dexter_advise(whatif: WhatIf, workload: Workload, catalog: Catalog, min_savings_pct: float = 50.0,
                  min_cost: float = 100.0) -> DexterResult:
    """Run the Dexter algorithm over the workload's templates (one instance each, as Dexter sees one query)."""
    ratio = 1.0 - min_savings_pct / 100.0
    queries: list[tuple[Template, object]] = []
    initial: dict[str, float] = {}
    for t in workload.templates:
        if not t.instances or t.kind != "select" and t.kind not in ("update", "delete"):
            continue
        inst = t.instances[0]
        cost0 = whatif.cost(inst)
        if cost0 is None or cost0 < min_cost:
            continue
        queries.append((t, inst))
        initial[t.fingerprint] = cost0
    possible = set()
    for t, _ in queries:
        possible |= _column_names(t.normalized_sql)
    tables = sorted({name for t, _ in queries for name in t.tables if name in catalog.tables})
    columns_by_table = {
        name: [c for c in catalog.tables[name].columns.values()
               if c.name in possible and not c.type.startswith(("json", "jsonb"))]
        for name in tables}
    singles = frozenset(IndexSpec(name, (c.name,), table_sql=catalog.tables[name].sql_name)
                        for name, cols in columns_by_table.items() for c in cols)
    pairs = frozenset(IndexSpec(name, (a.name, b.name), table_sql=catalog.tables[name].sql_name)
                      for name, cols in columns_by_table.items() for a, b in itertools.permutations(cols, 2))
    existing_prefixes = set()
    for name in tables:
        for idx in catalog.tables[name].indexes:
            if idx.method == "btree" and idx.is_valid:
                existing_prefixes.add((name, idx.columns[:1]))
                existing_prefixes.add((name, idx.columns[:2]))

    def new_indexes(plan) -> list[IndexSpec]:
        found = []
        for index_name in sorted(set(whatif.used_indexes(plan))):
            spec = whatif.spec_of(index_name)
            if spec is not None and (spec.table, spec.columns) not in existing_prefixes:
                found.append(spec)
        return found

    result = DexterResult([])
    chosen: dict[IndexSpec, float] = {}
    for t, inst in queries:
        cost0 = initial[t.fingerprint]
        plan1 = whatif.plan(inst, singles)
        plan2 = whatif.plan(inst, singles | pairs)
        if plan1 is None or plan2 is None:
            continue
        cost1, cost2 = plan1["Total Cost"], plan2["Total Cost"]
        savings1 = cost1 < cost0 * ratio
        savings2 = cost1 > min_cost and cost2 < cost1 * ratio
        query_indexes = new_indexes(plan2 if savings2 else plan1)
        if savings2 and len(query_indexes) > 1:
            query_indexes = new_indexes(plan1)
            savings2 = False
        suggest = savings1 or savings2
        new_cost = cost2 if savings2 else cost1
        if suggest and len(query_indexes) > 1:
            winner, winner_cost = None, None
            for spec in query_indexes:
                c = whatif.cost(inst, frozenset([spec]))
                if c is not None and (winner_cost is None or c < winner_cost):
                    winner, winner_cost = spec, c
            ok = winner_cost is not None and (
                (new_cost > min_cost and winner_cost < new_cost * ratio) if savings2 else winner_cost < cost0 * ratio)
            if ok:
                query_indexes, new_cost = [winner], winner_cost
            else:
                suggest = False
        result.per_query[t.fingerprint] = {"initial": cost0, "pass1": cost1, "pass2": cost2,
                                           "suggest": suggest, "indexes": [s.describe() for s in query_indexes]}
        if suggest:
            for spec in query_indexes:
                chosen[spec] = chosen.get(spec, 0.0) + t.calls * (cost0 - new_cost)
    covered = {(s.table, s.columns[:1]) for s in chosen if len(s.columns) > 1}
    result.indexes = sorted((s for s in chosen if (s.table, s.columns) not in covered),
                            key=lambda s: (s.table, s.columns))
    result.savings = {s: chosen[s] for s in result.indexes}
    return result


def within_budget(result: DexterResult, whatif: WhatIf, budget: int) -> tuple[list[IndexSpec], bool]:
    """Dexter has no budget: keep its indexes by decreasing savings while they fit. Returns (indexes, trimmed)."""
    kept, used = [], 0
    for spec in sorted(result.indexes, key=lambda s: -result.savings[s]):
        size = whatif.size(spec)
        if used + size <= budget:
            kept.append(spec)
            used += size
    return kept, len(kept) < len(result.indexes)
