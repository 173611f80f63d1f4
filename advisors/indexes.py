"""The index advisor: which indexes to create and which to drop, for the whole logged workload, under a budget.

1. Candidates come from each template's shape (advisors.predicates): equality columns ordered by
   selectivity, then one range column; join columns; ORDER BY / GROUP BY columns; covering variants
   (INCLUDE) and partial variants (a constant predicate that dominates).
2. Every candidate is costed with HypoPG on each template's sampled instances; the workload cost is the
   sum over templates of calls x mean estimated cost, plus each index's write overhead (rows the log says
   were written to its table x advisors.index_write_cost).
3. Selection is greedy with (lazy) re-evaluation under the storage budget, run twice (benefit per byte, and
   absolute benefit); indexes that stopped paying are pruned at the end. It stops at diminishing returns: an
   index must save at least min_benefit_fraction of the current workload cost, and at least min_gain_per_size
   times the share of the data's size it takes (see `min_gain`). Of the two results the smaller is kept unless
   the larger one's extra saving clears the same bar for its extra size.
4. Existing indexes are checked: invalid ones, exact duplicates, those covered by a longer index with the
   same prefix, and those never scanned since the statistics reset get drop advice, each checked against
   the workload (hidden with hypopg_hide_index where HypoPG has it, else by the plans that use it).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

from advisors.catalog import Catalog, Index, format_bytes, quote_ident, quote_literal
from advisors.predicates import TableAccess
from advisors.whatif import IndexSpec, WhatIf
from advisors.workload import Template, Workload

log = logging.getLogger("pgpilot.advisors")

_UNINDEXABLE = ("json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle", "tsvector",
                "tsquery", "bytea")
_NUMERIC = ("smallint", "integer", "bigint", "numeric", "real", "double precision")


@dataclass
class TemplateEffect:
    fingerprint: str
    label: str
    calls: float
    cost_before: float
    cost_after: float


@dataclass
class IndexRecommendation:
    action: str                    # create | drop
    table: str
    index_name: str
    ddl: str
    definition: str
    size_bytes: int
    benefit: float                 # workload cost saved over the window (planner units), write overhead included
    write_overhead: float
    confidence: float
    confidence_label: str
    reason: str
    templates: list[TemplateEffect] = field(default_factory=list)
    spec: IndexSpec | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("spec")
        return d


@dataclass
class IndexAdvice:
    database: str
    budget_bytes: int
    used_bytes: int
    workload_source: str
    templates: int
    calls: float
    instance_sources: dict[str, int]
    cost_before: float
    cost_after: float
    recommendations: list[IndexRecommendation]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    explains: int = 0
    current_costs: dict[str, float] = field(default_factory=dict, repr=False)  # per template, existing indexes

    @property
    def creates(self) -> list[IndexRecommendation]:
        return [r for r in self.recommendations if r.action == "create"]

    @property
    def drops(self) -> list[IndexRecommendation]:
        return [r for r in self.recommendations if r.action == "drop"]

    def to_dict(self) -> dict:
        return {
            "database": self.database, "budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes,
            "workload_source": self.workload_source, "templates": self.templates, "calls": self.calls,
            "instance_sources": self.instance_sources, "estimated_cost_before": self.cost_before,
            "estimated_cost_after": self.cost_after, "notes": self.notes, "seconds": round(self.seconds, 2),
            "explains": self.explains, "recommendations": [r.to_dict() for r in self.recommendations],
        }


@dataclass
class AdvisorSettings:
    """The advisors section of the configuration, as the index advisor uses it."""
    max_index_columns: int = 4
    max_include_columns: int = 6
    index_write_cost: float = 0.5
    min_benefit_fraction: float = 0.005
    partial_min_share: float = 0.8
    unused_min_days: float = 7.0
    instances_for_selection: int = 3
    min_gain_per_size: float = 0.25

    @classmethod
    def from_config(cls, cfg) -> "AdvisorSettings":
        return cls(cfg.max_index_columns, cfg.max_include_columns, cfg.index_write_cost,
                   cfg.min_benefit_fraction, cfg.partial_min_share, cfg.unused_min_days,
                   cfg.instances_per_template, cfg.min_gain_per_size)


def min_gain(current_cost: float, size_bytes: int, data_bytes: int, min_fraction: float,
             min_gain_per_size: float) -> float:
    """The least an index must save (planner cost units, write overhead deducted) to be worth creating.

    Two bars relative to what the workload costs now, with the indexes already chosen: a share of that cost
    (`min_fraction`), and a share proportional to the index's size (`min_gain_per_size` x size / data size).
    With min_gain_per_size = 0.25, an index a tenth the size of the data must cut the remaining workload cost
    by 2.5%: returns diminish as indexes are added, and an index that buys little for its space (and for the
    writes and cache it costs, which the planner does not see) is left out even when the budget has room.
    """
    share = min_gain_per_size * size_bytes / data_bytes if data_bytes > 0 else 0.0
    return current_cost * max(min_fraction, share)


# -- costs ------------------------------------------------------------------------------------------------------

class WorkloadCost:
    """Workload cost under a configuration: sum of calls x mean instance cost, plus write overhead."""

    def __init__(self, whatif: WhatIf, workload: Workload, catalog: Catalog, settings: AdvisorSettings):
        self.whatif = whatif
        self.workload = workload
        self.catalog = catalog
        self.settings = settings
        self.templates = [t for t in workload.templates if t.instances]
        self._instances = {t.fingerprint: t.instances[:settings.instances_for_selection] for t in self.templates}
        self.baseline: dict[str, float] = {}
        for t in list(self.templates):
            c = self.template_cost(t, frozenset())
            if c is None:
                self.templates.remove(t)
            else:
                self.baseline[t.fingerprint] = c
        self.by_table: dict[str, list[Template]] = {}
        for t in self.templates:
            for name in t.tables:
                self.by_table.setdefault(name, []).append(t)

    def template_cost(self, t: Template, config, hidden=frozenset(), first_only: bool = False) -> float | None:
        instances = self._instances[t.fingerprint]
        costs = [self.whatif.cost(i, config, hidden) for i in (instances[:1] if first_only else instances)]
        costs = [c for c in costs if c is not None]
        return sum(costs) / len(costs) if costs else None

    def query_cost(self, config, templates=None, hidden=frozenset()) -> float:
        total = 0.0
        for t in self.templates if templates is None else templates:
            c = self.template_cost(t, config, hidden)
            total += t.calls * (c if c is not None else self.baseline[t.fingerprint])
        return total

    def write_overhead(self, table: str, columns: set[str]) -> float:
        rows = self.workload.write_rows.get(table, {})
        updated = self.workload.updated_columns.get(table, set())
        # An UPDATE that changes none of the index's columns can be HOT and then skips the index.
        update_share = 1.0 if updated & columns else 0.1
        return self.settings.index_write_cost * (rows.get("insert", 0.0) + rows.get("merge", 0.0)
                                                 + rows.get("copy", 0.0) + update_share * rows.get("update", 0.0))

    def spec_overhead(self, spec: IndexSpec) -> float:
        return self.write_overhead(spec.table, set(spec.columns) | set(spec.include))

    def total(self, config) -> float:
        return self.query_cost(config) + sum(self.spec_overhead(s) for s in config)


# -- candidates -------------------------------------------------------------------------------------------------

def _indexable(table, col: str) -> bool:
    c = table.columns.get(col)
    if c is None or c.type.startswith(_UNINDEXABLE) or c.type.endswith("[]"):
        return False
    return not (c.avg_width is not None and c.avg_width > 512)


def equality_selectivity(table, col: str) -> float:
    """Expected share of rows an equality on the column keeps, for a value drawn like the data.

    Most common values weigh by their frequency (sum of squares of most_common_freqs); the rest share the
    remaining frequency over the remaining distinct values (pg_stats n_distinct).
    """
    c = table.columns.get(col)
    if c is None or not c.n_distinct:
        return 1.0
    freqs = c.most_common_freqs or []
    rest = max(0.0, 1.0 - sum(freqs) - (c.null_frac or 0.0))
    others = max(c.n_distinct - len(freqs), 1.0)
    return sum(f * f for f in freqs) + rest * rest / others


def _literal_for(table, col: str, value: str) -> str:
    typ = table.columns[col].type
    if typ.startswith(_NUMERIC):
        return value
    if typ == "boolean":
        return value
    return f"{quote_literal(value)}::{typ}"


def _partial_predicates(t: Template, access: TableAccess, settings: AdvisorSettings) -> list[tuple[str, str]]:
    """(column, predicate) pairs that hold in (nearly) every call of the template."""
    table = access.table
    out = []
    for col, is_null in access.nulls.items():
        out.append((col, f"{quote_ident(col)} IS {'' if is_null else 'NOT '}NULL"))
    for col, flag in access.booleans.items():
        out.append((col, quote_ident(col) if flag else f"NOT {quote_ident(col)}"))
    for col, values in access.equality.items():
        consts = {v.text for v in values if v.kind == "const"}
        params = [v.param for v in values if v.kind == "param"]
        if len(values) == 1 and len(consts) == 1 and None not in consts:
            out.append((col, f"{quote_ident(col)} = {_literal_for(table, col, consts.pop())}"))
        elif len(values) == 1 and params and t.logged_params:
            seen = [p[params[0] - 1] for p in t.logged_params if len(p) >= params[0]]
            if seen:
                top = max(set(seen), key=seen.count)
                if top is not None and seen.count(top) / len(seen) >= settings.partial_min_share:
                    out.append((col, f"{quote_ident(col)} = {_literal_for(table, col, top)}"))
    return out


def access_candidates(t: Template, access: TableAccess, settings: AdvisorSettings) -> set[IndexSpec]:
    """Index candidates for one table reference of one template."""
    table = access.table
    maxcols = settings.max_index_columns
    ok = lambda c: _indexable(table, c)  # noqa: E731
    by_sel = lambda cols: sorted(cols, key=lambda c: (equality_selectivity(table, c), c))  # noqa: E731
    eq = by_sel([c for c in access.equality if ok(c)])
    joins = by_sel([c for c in access.joins if ok(c) and c not in eq])
    ranges = by_sel([c for c in access.ranges if ok(c) and c not in eq])
    order = [c for c, _ in access.order_by if ok(c)]
    group = [c for c in access.group_by if ok(c)]
    keysets: list[tuple[str, ...]] = []

    def add(cols) -> None:
        seen: list[str] = []
        for c in cols:
            if c not in seen:
                seen.append(c)
        if seen:
            keysets.append(tuple(seen[:maxcols]))

    for c in eq + joins + ranges:
        add([c])
    if order:
        add(order)
    if group:
        add(group)
    if len(eq) > 1:
        add(eq)
    if eq and ranges:
        add(eq[:maxcols - 1] + ranges[:1])
    if eq and joins:
        add(eq[:maxcols - 1] + joins[:1])
        add(joins[:1] + eq[:maxcols - 1])
    if len(joins) > 1:
        add(joins[:2])
        if ranges:
            add(joins[:2] + ranges[:1])
    if joins and ranges:
        add(joins[:1] + ranges[:1])
    if eq + joins and ranges and len(eq + joins) > 1:
        add(eq + joins[:maxcols - 1 - len(eq)] + ranges[:1])
    if order and (eq or joins) and not ranges:
        add(eq + joins[:1] + order)
    if group and eq:
        add(eq + group)

    specs = {IndexSpec(table.qualified, k, table_sql=table.sql_name) for k in keysets}
    # Covering variants: every column the query needs from this table, so an index-only scan can answer it.
    if settings.max_include_columns and not access.star:
        for keys in list({s.columns for s in specs}):
            rest = sorted(c for c in access.referenced if c not in keys and ok(c))
            if rest and len(rest) <= settings.max_include_columns and len(keys) + len(rest) < len(table.columns):
                specs.add(IndexSpec(table.qualified, keys, tuple(rest), table_sql=table.sql_name))
    for pcol, predicate in _partial_predicates(t, access, settings):
        keys = [c for c in (eq + joins + ranges + order) if c != pcol][:maxcols]
        if not keys:
            keys = [pcol]
        specs.add(IndexSpec(table.qualified, tuple(keys), where=predicate, table_sql=table.sql_name))
        specs.add(IndexSpec(table.qualified, tuple(keys[:1]), where=predicate, table_sql=table.sql_name))
    return specs


def served_by_existing(spec: IndexSpec, indexes: list[Index]) -> bool:
    """An existing valid B-tree index already gives what the candidate would (same leading keys, covers it)."""
    for idx in indexes:
        if not idx.is_valid or idx.method != "btree" or idx.predicate is not None and spec.where is None:
            continue
        if spec.where is not None and idx.predicate is not None:
            continue  # different predicates are hard to compare; let the planner judge
        keys = idx.columns
        if keys[:len(spec.columns)] != spec.columns:
            continue
        if set(spec.include) <= set(keys) | set(idx.include):
            return True
    return False


def generate_candidates(workload: Workload, catalog: Catalog, settings: AdvisorSettings,
                        templates: list[Template] | None = None) -> dict[IndexSpec, set[str]]:
    """Every candidate with the fingerprints of the templates that suggested it."""
    out: dict[IndexSpec, set[str]] = {}
    for t in templates if templates is not None else workload.templates:
        for access in t.shape.accesses:
            for spec in access_candidates(t, access, settings):
                if not served_by_existing(spec, access.table.indexes):
                    out.setdefault(spec, set()).add(t.fingerprint)
    return out


# -- selection --------------------------------------------------------------------------------------------------

class Selector:
    """Greedy selection with re-evaluation under a byte budget (see the module docstring)."""

    def __init__(self, model: WorkloadCost, candidates: dict[IndexSpec, set[str]], budget: int,
                 min_fraction: float, progress_every: float = 10.0, data_bytes: int = 0,
                 min_gain_per_size: float = 0.0):
        self.model = model
        self.budget = budget
        self.min_fraction = min_fraction
        self.data_bytes = data_bytes
        self.min_gain_per_size = min_gain_per_size
        self.progress_every = progress_every
        self.sizes = {s: model.whatif.size(s) for s in candidates}
        self.affected: dict[IndexSpec, list[Template]] = {}
        self.single_gain: dict[IndexSpec, float] = {}
        started = last = time.monotonic()
        for i, spec in enumerate(candidates):
            # Screening plans one instance per template; the selection itself plans them all.
            gain, helped = self._gain(spec, frozenset(), self._relevant(spec, candidates[spec]), first_only=True)
            if helped:
                self.affected[spec] = helped
                self.single_gain[spec] = gain
            if time.monotonic() - last > progress_every:
                last = time.monotonic()
                log.info("costed %d/%d candidates in %.0fs", i + 1, len(candidates), last - started)

    def _relevant(self, spec: IndexSpec, suggested_by: set[str]) -> list[Template]:
        """Templates that filter, join, sort or group on the index's leading column (the only ones it can help).

        A covering or partial variant is shaped after the templates that suggested it: only those are tried.
        """
        lead = spec.columns[0]
        out = []
        for t in self.model.by_table.get(spec.table, []):
            if (spec.include or spec.where) and t.fingerprint not in suggested_by:
                continue
            for a in t.shape.accesses_of(spec.table):
                if (lead in a.filter_columns() or lead in a.likes or lead in a.group_by
                        or any(c == lead for c, _ in a.order_by)):
                    out.append(t)
                    break
        return out

    def _gain(self, spec: IndexSpec, chosen: frozenset, templates,
              first_only: bool = False) -> tuple[float, list[Template]]:
        """Workload cost saved by adding `spec` to `chosen` (write overhead deducted), and who benefits."""
        with_spec = chosen | {spec}
        gain = 0.0
        helped = []
        for t in templates:
            before = self.model.template_cost(t, chosen, first_only=first_only)
            after = self.model.template_cost(t, with_spec, first_only=first_only)
            if before is None or after is None:
                continue
            if after < before * 0.9999:
                gain += t.calls * (before - after)
                helped.append(t)
        return gain - self.model.spec_overhead(spec), helped

    def gain(self, spec: IndexSpec, chosen: frozenset) -> float:
        return self._gain(spec, chosen, self.affected[spec])[0]

    def min_gain(self, spec: IndexSpec, current_cost: float) -> float:
        return min_gain(current_cost, self.sizes[spec], self.data_bytes, self.min_fraction, self.min_gain_per_size)

    def run(self, per_byte: bool) -> list[IndexSpec]:
        chosen: list[IndexSpec] = []
        used = 0
        pool = set(self.affected)
        bound = {s: self.single_gain[s] for s in pool}  # upper bounds: gains only shrink as indexes are added

        def score(s: IndexSpec, g: float) -> float:
            return g / max(self.sizes[s], 8192) if per_byte else g

        rechecked = False
        while True:
            # An index must save a share of what the workload costs now, not of what it cost without indexes.
            current = self.model.total(frozenset(chosen))
            bar = {s: self.min_gain(s, current) for s in pool}
            fits = sorted((s for s in pool if used + self.sizes[s] <= self.budget and bound[s] > bar[s]),
                          key=lambda s: score(s, bound[s]), reverse=True)
            picked = None
            fresh: dict[IndexSpec, float] = {}   # re-costed gains of the candidates that clear their bar
            for k, s in enumerate(fits):
                bound[s] = self.gain(s, frozenset(chosen))
                if bound[s] > bar[s]:
                    fresh[s] = bound[s]
                best = max(fresh, key=lambda x: score(x, fresh[x]), default=None)
                # Lazy evaluation: stop once the best fresh score beats every remaining (stale) bound.
                if k + 1 == len(fits) or best is not None and score(best, fresh[best]) >= score(
                        fits[k + 1], bound[fits[k + 1]]):
                    picked = best
                    break
            if picked is None:
                if rechecked or not fits and not pool:
                    break
                # Re-evaluate the most promising once: an index may pay only next to one chosen since.
                fitting = [s for s in pool if used + self.sizes[s] <= self.budget]
                for s in sorted(fitting, key=lambda s: score(s, self.single_gain[s]), reverse=True)[:20]:
                    bound[s] = self.gain(s, frozenset(chosen))
                rechecked = True
                continue
            rechecked = False
            chosen.append(picked)
            used += self.sizes[picked]
            pool.discard(picked)
        return self.prune(chosen)

    def prune(self, chosen: list[IndexSpec]) -> list[IndexSpec]:
        """Drop indexes that no longer pay once the others exist (a later, wider index can subsume one)."""
        while chosen:
            current = self.model.total(frozenset(chosen))
            # The index furthest below its bar goes first; then the others are judged again without it.
            worst, worst_ratio = None, 1.0
            for spec in chosen:
                gain = self.gain(spec, frozenset(x for x in chosen if x is not spec))
                bar = self.min_gain(spec, current)
                ratio = gain / bar if bar > 0 else math.inf if gain > 0 else 0.0
                if ratio <= worst_ratio:
                    worst, worst_ratio = spec, ratio
            if worst is None:
                break
            chosen.remove(worst)
        return chosen

    def select(self) -> list[IndexSpec]:
        results = []
        for per_byte in (True, False):
            picked = self.run(per_byte)
            cost, size = self.model.total(frozenset(picked)), sum(self.sizes[s] for s in picked)
            log.info("greedy (%s): %d indexes, %s, workload cost %.4g", "per byte" if per_byte else "absolute",
                     len(picked), format_bytes(size), cost)
            results.append((size, cost, picked))
        # The smaller result, unless the larger one's extra saving clears the same bar for its extra size.
        (small_size, small_cost, small), (large_size, large_cost, large) = sorted(results, key=lambda r: r[:2])
        extra = min_gain(large_cost, large_size - small_size, self.data_bytes, self.min_fraction,
                         self.min_gain_per_size)
        return large if small_cost - large_cost > extra else small


# -- existing indexes -------------------------------------------------------------------------------------------

def _same_definition(a: Index, b: Index) -> bool:
    return (a.method == b.method and a.columns == b.columns and set(a.include) == set(b.include)
            and (a.predicate or "") == (b.predicate or ""))


def _confidence_label(c: float) -> str:
    return "high" if c >= 0.7 else "medium" if c >= 0.4 else "low"


def drop_advice(catalog: Catalog, model: WorkloadCost | None, settings: AdvisorSettings,
                new_specs: list[IndexSpec] = ()) -> list[IndexRecommendation]:
    """Invalid, duplicate, prefix-covered and unused indexes, each checked against the workload's plans.

    With HypoPG >= 1.4 an index is hidden and the workload re-planned (the cost it would add decides);
    older HypoPG cannot hide real indexes, so the check is whether any template's plan uses the index,
    counting a plan that uses a duplicate or a prefix as a use of the index that takes over.
    """
    out: list[IndexRecommendation] = []
    window = catalog.stats_window
    window_days = window.total_seconds() / 86400 if window else 0.0
    advised: set[int] = set()
    heir: dict[int, int] = {}    # dropped index -> the index its queries move to
    config = frozenset(new_specs)
    by_name = {(i.schema, i.name): i for t in catalog.tables.values() for i in t.indexes}
    uses: dict[int, list[Template]] = {}
    if model is not None and not model.whatif.can_hide:
        for t in model.templates:
            for inst in model._instances[t.fingerprint]:
                plan = model.whatif.plan(inst, config)
                for name in set(model.whatif.used_indexes(plan) if plan else ()):
                    idx = next((i for (schema, n), i in by_name.items() if n == name), None)
                    if idx is not None and t not in uses.setdefault(idx.oid, []):
                        uses[idx.oid].append(t)

    def users(idx: Index) -> list[Template]:
        """Templates whose plans use idx, or an index whose queries move to idx once it is dropped."""
        found = list(uses.get(idx.oid, []))
        for dropped, target in heir.items():
            if target == idx.oid:
                found += [t for t in uses.get(dropped, []) if t not in found]
        return found

    def cost_increase(idx: Index) -> tuple[float, list[TemplateEffect]]:
        """What the workload loses without idx, once the advised indexes exist and earlier drops are done."""
        if model is None:
            return 0.0, []
        if not model.whatif.can_hide:
            effects = [TemplateEffect(t.fingerprint, t.label, t.calls, model.baseline[t.fingerprint],
                                      model.baseline[t.fingerprint]) for t in users(idx)]
            return (math.inf if effects else 0.0), effects
        effects, increase = [], 0.0
        for t in model.by_table.get(idx.table, []):
            before = model.template_cost(t, config, frozenset(advised))
            after = model.template_cost(t, config, frozenset(advised | {idx.oid}))
            if before is None or after is None:
                continue
            if after > before * 1.0001:
                increase += t.calls * (after - before)
                effects.append(TemplateEffect(t.fingerprint, t.label, t.calls, before, after))
        return increase, effects

    def recommend(idx: Index, reason: str, confidence: float, successor: Index | None = None) -> None:
        if idx.oid in advised:
            return
        saved = model.write_overhead(idx.table, set(idx.columns) | set(idx.include)) if model else 0.0
        effects: list[TemplateEffect] = []
        if successor is None and not reason.startswith(("invalid", "covered by the advised")):
            increase, effects = cost_increase(idx)
            noise = 1e-4 * model.query_cost(config, hidden=frozenset(advised)) if model else 0.0
            # Worth keeping when the reads it speeds up outweigh the writes it slows down.
            if increase > max(saved, noise):
                log.info("keeping %s: the workload's plans need it", idx.name)
                return
        else:
            increase = 0.0
            effects = [TemplateEffect(t.fingerprint, t.label, t.calls, model.baseline[t.fingerprint],
                                      model.baseline[t.fingerprint]) for t in users(idx)] if model else []
        advised.add(idx.oid)
        if successor is not None:
            heir[idx.oid] = successor.oid
        out.append(IndexRecommendation(
            "drop", idx.table, idx.name, f"DROP INDEX CONCURRENTLY {idx.qualified_name};", idx.definition,
            idx.size_bytes, saved - (increase if math.isfinite(increase) else 0.0), -saved, confidence,
            _confidence_label(confidence), reason, effects))

    tables = sorted(catalog.tables.values(), key=lambda t: t.qualified)
    for table in tables:
        for idx in table.indexes:
            if not idx.is_valid:
                recommend(idx, "invalid: a failed CREATE INDEX CONCURRENTLY left it; it is maintained on every "
                               "write but never used (REINDEX INDEX CONCURRENTLY it instead if it is wanted)", 0.95)
    for table in tables:
        valid = [i for i in table.indexes if i.is_valid]
        for i, a in enumerate(valid):
            for b in valid[i + 1:]:
                if _same_definition(a, b) and a.is_unique == b.is_unique and a.oid not in advised \
                        and b.oid not in advised:
                    victim = b if (a.is_constraint and not b.is_constraint) or (
                        a.is_constraint == b.is_constraint and a.oid < b.oid) else a
                    if not victim.is_constraint:
                        keeper = a if victim is b else b
                        recommend(victim, f"duplicate of {keeper.name}", 0.9, successor=keeper)
    for table in tables:
        valid = [i for i in table.indexes if i.is_valid and i.method == "btree" and i.oid not in advised]
        for a in valid:
            if a.is_unique or a.is_constraint or a.predicate is not None:
                continue
            for b in valid:
                if b is a or b.predicate is not None or len(b.columns) <= len(a.columns) or b.oid in advised:
                    continue
                if b.columns[:len(a.columns)] == a.columns and set(a.include) <= set(b.columns) | set(b.include):
                    recommend(a, f"covered by {b.name}: its leading columns are the same", 0.75, successor=b)
                    break
        for spec in new_specs:
            if spec.table != table.qualified or spec.where is not None:
                continue
            for a in valid:
                if a.is_unique or a.is_constraint or a.predicate is not None or len(spec.columns) <= len(a.columns):
                    continue
                if spec.columns[:len(a.columns)] == a.columns and set(a.include) <= set(spec.columns) | set(
                        spec.include):
                    recommend(a, f"covered by the advised index on ({', '.join(spec.columns)})", 0.6)
    for table in tables:
        for idx in table.indexes:
            if not idx.is_valid or idx.is_unique or idx.is_constraint or idx.idx_scan is None or idx.idx_scan > 0:
                continue
            confidence = 0.9 if window_days >= 4 * settings.unused_min_days else \
                0.6 if window_days >= settings.unused_min_days else 0.3
            since = catalog.stats_since.isoformat(timespec="minutes") if catalog.stats_since else "?"
            recommend(idx, f"unused: never scanned since statistics began ({since}, {window_days:.1f} days)",
                      confidence)
    return out


# -- the advisor ------------------------------------------------------------------------------------------------

def confidence_for(effects: list[TemplateEffect], templates: dict[str, Template]) -> float:
    """From how the estimate was made (logged values beat generic plans), how often, and by how much."""
    if not effects:
        return 0.0
    basis = {"logged": 1.0, "sample": 0.95, "literal": 1.0, "synthesized": 0.8, "generic": 0.6}
    calls = sum(e.calls for e in effects)
    before = sum(e.calls * e.cost_before for e in effects)
    after = sum(e.calls * e.cost_after for e in effects)
    relative = 1.0 - after / before if before > 0 else 0.0
    weights = [basis.get(templates[e.fingerprint].instances[0].source, 0.6) for e in effects]
    how = sum(w * e.calls for w, e in zip(weights, effects)) / calls
    evidence = min(1.0, math.log10(1 + calls) / 2)      # 100 calls: full weight
    magnitude = min(1.0, relative / 0.5)                 # halving the cost: full weight
    return round(how * (0.5 + 0.5 * evidence) * (0.4 + 0.6 * magnitude), 3)


def _unique_name(spec: IndexSpec, catalog: Catalog, taken: set[str]) -> str:
    table = catalog.tables[spec.table]
    existing = {i.name for t in catalog.tables.values() if t.schema == table.schema for i in t.indexes}
    name = spec.default_name()
    base, n = name, 1
    while name in existing or name in taken:
        n += 1
        name = f"{base[:59]}{n}"
    taken.add(name)
    return name


def workload_data_bytes(workload: Workload, catalog: Catalog) -> int:
    """Heap size of the tables the workload reads (what a budget of N% and min_gain_per_size refer to)."""
    names = {n for t in workload.templates for n in t.tables}
    return sum(catalog.tables[n].heap_bytes for n in names if n in catalog.tables)


def advise_indexes(target_conn, workload: Workload, catalog: Catalog, budget_bytes: int,
                   settings: AdvisorSettings | None = None, whatif: WhatIf | None = None,
                   include_drops: bool = True) -> IndexAdvice:
    """Index advice for `workload` on the database of `target_conn` (which must be able to use HypoPG)."""
    started = time.monotonic()
    settings = settings or AdvisorSettings()
    own_whatif = whatif is None
    whatif = whatif or WhatIf(target_conn, catalog)
    try:
        model = WorkloadCost(whatif, workload, catalog, settings)
        sources: dict[str, int] = {}
        for t in model.templates:
            sources[t.instances[0].source] = sources.get(t.instances[0].source, 0) + 1
        before = model.total(frozenset())
        candidates = generate_candidates(workload, catalog, settings, model.templates)
        log.info("%d templates, %d candidate indexes", len(model.templates), len(candidates))
        selector = Selector(model, candidates, budget_bytes, settings.min_benefit_fraction,
                            data_bytes=workload_data_bytes(workload, catalog),
                            min_gain_per_size=settings.min_gain_per_size)
        chosen = selector.select()
        final = frozenset(chosen)
        after = model.total(final)
        by_fp = {t.fingerprint: t for t in model.templates}
        recs: list[IndexRecommendation] = []
        taken: set[str] = set()
        for spec in chosen:
            rest = final - {spec}
            effects = []
            for t in model.by_table.get(spec.table, []):
                without = model.template_cost(t, rest)
                with_all = model.template_cost(t, final)
                if without is not None and with_all is not None and with_all < without * 0.9999:
                    effects.append(TemplateEffect(t.fingerprint, t.label, t.calls, model.baseline[t.fingerprint],
                                                  with_all))
            effects.sort(key=lambda e: -e.calls * (e.cost_before - e.cost_after))
            name = _unique_name(spec, catalog, taken)
            confidence = confidence_for(effects, by_fp)
            overhead = model.spec_overhead(spec)
            recs.append(IndexRecommendation(
                "create", spec.table, name, spec.create_sql(name) + ";", spec.describe(), selector.sizes[spec],
                selector.gain(spec, rest), overhead, confidence, _confidence_label(confidence),
                f"helps {len(effects)} template(s)", effects, spec))
        recs.sort(key=lambda r: -r.benefit)
        if include_drops:
            recs.extend(drop_advice(catalog, model, settings, chosen))
        notes = list(workload.notes)
        if not model.templates:
            notes.append("no template could be planned: nothing to advise")
        return IndexAdvice(catalog.database, budget_bytes, sum(selector.sizes[s] for s in chosen), workload.source,
                           len(model.templates), sum(t.calls for t in model.templates), sources, before, after,
                           recs, notes, time.monotonic() - started, whatif.explains, dict(model.baseline))
    finally:
        if own_whatif:
            whatif.close()


def apply_advice(conn, advice: IndexAdvice, drops: bool = False, log_each=print) -> list[str]:
    """Run the advised DDL (CREATE INDEX CONCURRENTLY; DROP INDEX CONCURRENTLY only with drops=True)."""
    done = []
    conn.execute("SET statement_timeout = 0")  # building an index on a big table takes what it takes
    for rec in advice.recommendations:
        if rec.action == "drop" and not drops:
            continue
        log_each(f"running: {rec.ddl}")
        conn.execute(rec.ddl.rstrip(";"))
        done.append(rec.ddl)
    return done
