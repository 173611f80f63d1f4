"""What the cache needs from an upstream database's catalog: relations and their generation keys, a signature
that changes with any DDL, and the probe that decides whether a SELECT is safe to cache.

Generation keys: a relation's key is the schema-qualified name of the root of its inheritance/partition tree
(the tree's member with no parent and the lowest OID), so a write to any member, and a read through any
member, meet on one key.

The probe lets Postgres do the name resolution: it creates a temporary view over the statement inside a
transaction that is rolled back, and reads the view's analysed query tree (pg_rewrite.ev_action), which
names every function, operator and relation by OID after search_path, overloads and implicit casts were
resolved. Views are followed through their own trees. Nothing of the client's statement is executed.

The signature sums (identity, xmin) over the catalogs that can change a result or a verdict; an in-place
update (VACUUM/ANALYZE statistics) keeps xmin, so it does not count. Temporary objects are left out.
"""
from __future__ import annotations

import re

from proxy.cache import safety as S
from proxy.cache.context import CacheContext

FIRST_NORMAL_OID = 16384

_SIMPLE_IDENT = re.compile(r"[a-z_][a-z0-9_$]*\Z")


def qualified(schema: str, name: str) -> str:
    """schema.name, each part double-quoted unless it is a plain lower-case identifier (an injective spelling)."""
    def q(s: str) -> str:
        return s if _SIMPLE_IDENT.match(s) else '"' + s.replace('"', '""') + '"'
    return f"{q(schema)}.{q(name)}"


class Relation:
    __slots__ = ("oid", "schema", "name", "kind", "persistence", "rls", "field", "tree_reason")

    def __init__(self, oid: int, schema: str, name: str, kind: str, persistence: str, rls: bool):
        self.oid = oid
        self.schema = schema
        self.name = name
        self.kind = kind                 # pg_class.relkind
        self.persistence = persistence   # p, u, t
        self.rls = rls
        self.field = qualified(schema, name)   # replaced by the tree root's name below
        self.tree_reason: str | None = None    # a member of its tree the cache cannot follow


class CatalogSnapshot:
    """User relations by name and OID with their generation fields, and the names of volatile user functions."""

    def __init__(self, relations: list[Relation], inherits: list[tuple[int, int]], volatile_names: set[str],
                 signature: str):
        self.by_oid = {r.oid: r for r in relations}
        self.by_name = {(r.schema, r.name): r for r in relations}
        self.volatile_names = frozenset(volatile_names) | S.BUILTIN_WRITERS
        self.signature = signature
        self._link_trees(inherits)

    def _link_trees(self, inherits: list[tuple[int, int]]) -> None:
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.get(x, x) != x:
                parent[x] = parent.get(parent[x], parent[x])
                x = parent[x]
            return x

        has_parent: set[int] = set()
        foreign_members: set[int] = set()
        nodes: set[int] = set()
        for child, par in inherits:
            has_parent.add(child)
            nodes.update((child, par))
            for x in (child, par):
                if x not in self.by_oid:
                    foreign_members.add(x)   # a temporary (or otherwise unlisted) member
            a, b = find(child), find(par)
            if a != b:
                parent[max(a, b)] = min(a, b)
        members: dict[int, list[int]] = {}
        for x in nodes:
            members.setdefault(find(x), []).append(x)
        for group in members.values():
            listed = [self.by_oid[x] for x in group if x in self.by_oid]
            roots = [r for r in listed if r.oid not in has_parent] or listed
            if not roots:
                continue
            root = min(roots, key=lambda r: r.oid)
            reason = None
            if any(x in foreign_members for x in group):
                reason = S.TEMP_TABLE
            elif any(r.kind == "f" for r in listed):
                reason = S.FOREIGN_TABLE
            elif any(r.persistence == "u" for r in listed):
                reason = S.UNLOGGED
            for r in listed:
                r.field = root.field
                r.tree_reason = reason

    def resolve(self, name: str, schemas: tuple[str, ...]) -> list[Relation] | None:
        """The relations a written name (as proxy.analysis spells it) may denote; None when unknown."""
        found = []
        if "." in name:
            schema, _, rel = name.partition(".")
            r = self.by_name.get((schema, rel))
            if r is not None:
                found.append(r)
        for s in schemas:
            r = self.by_name.get((s, name))
            if r is not None:
                found.append(r)
                break
        return found or None


# ---------------------------------------------------------------- loading

_TEMP = """tn AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_'),
tc AS (SELECT oid FROM pg_catalog.pg_class WHERE relnamespace IN (SELECT oid FROM tn))"""
_BY_OID = "(oid::int8 << 32) | xmin::text::int8"
_BY_CTID = "hashtextextended(ctid::text || ':' || xmin::text, 0)"
# (catalog, row identity + version, filter): every catalog whose change can alter a result or a verdict.
_SIGNED = [
    ("pg_class", _BY_OID, "relnamespace NOT IN (SELECT oid FROM tn)"),
    ("pg_attribute", _BY_CTID, f"attrelid >= {FIRST_NORMAL_OID} AND attrelid NOT IN (SELECT oid FROM tc)"),
    ("pg_namespace", _BY_OID, "oid NOT IN (SELECT oid FROM tn)"),
    ("pg_proc", _BY_OID, "pronamespace NOT IN (SELECT oid FROM tn)"),
    ("pg_type", _BY_OID, "typnamespace NOT IN (SELECT oid FROM tn)"),
    ("pg_rewrite", _BY_OID, "ev_class NOT IN (SELECT oid FROM tc)"),
    ("pg_inherits", _BY_CTID, "inhrelid NOT IN (SELECT oid FROM tc)"),
    ("pg_policy", _BY_OID, "polrelid NOT IN (SELECT oid FROM tc)"),
    ("pg_operator", _BY_OID, "true"), ("pg_cast", _BY_OID, "true"), ("pg_enum", _BY_OID, "true"),
    ("pg_aggregate", _BY_CTID, "true"), ("pg_range", _BY_CTID, "true"), ("pg_collation", _BY_OID, "true"),
    ("pg_opclass", _BY_OID, "true"), ("pg_amop", _BY_OID, "true"), ("pg_amproc", _BY_OID, "true"),
    ("pg_conversion", _BY_OID, "true"), ("pg_ts_config", _BY_OID, "true"), ("pg_ts_config_map", _BY_CTID, "true"),
    ("pg_ts_dict", _BY_OID, "true"), ("pg_auth_members", _BY_CTID, "true"),
    ("pg_db_role_setting", _BY_CTID, "true"), ("pg_database", _BY_OID, "true"),
]
SIGNATURE_SQL = "WITH " + _TEMP + "\n" + "\nUNION ALL ".join(
    f"SELECT '{cat}', count(*), coalesce(sum({expr}), 0)::text FROM pg_catalog.{cat} WHERE {flt}"
    for cat, expr, flt in _SIGNED) + \
    "\nUNION ALL SELECT 'pg_roles', count(*), md5(string_agg(r::text, ',' ORDER BY r.oid)) FROM pg_catalog.pg_roles r"

_RELATIONS_SQL = """
SELECT c.oid::int8, n.nspname, c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname !~ '^pg_(toast_)?temp_'"""
_INHERITS_SQL = "SELECT inhrelid::int8, inhparent::int8 FROM pg_catalog.pg_inherits"
_VOLATILE_SQL = f"""SELECT DISTINCT lower(proname) FROM pg_catalog.pg_proc
WHERE oid >= {FIRST_NORMAL_OID} AND provolatile = 'v'"""


async def catalog_signature(conn) -> str:
    rows = await conn.fetch(SIGNATURE_SQL)
    return ";".join(f"{r[0]}:{r[1]}:{r[2]}" for r in rows)


async def load_snapshot(conn) -> CatalogSnapshot:
    """Relations, trees, volatile function names and the signature, read in one consistent snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        signature = await catalog_signature(conn)
        rels = [Relation(*r) for r in await conn.fetch(_RELATIONS_SQL)]
        inherits = [(r[0], r[1]) for r in await conn.fetch(_INHERITS_SQL)]
        volatile = {r[0] for r in await conn.fetch(_VOLATILE_SQL)}
    return CatalogSnapshot(rels, inherits, volatile, signature)


# ---------------------------------------------------------------- the probe

class ProbeResult:
    __slots__ = ("reason", "fields", "stale", "detail")

    def __init__(self, reason: str | None, fields: tuple[str, ...] = (), stale: bool = False, detail: str = ""):
        self.reason = reason        # None: cacheable
        self.fields = fields        # generation fields of the tables read
        self.stale = stale          # the snapshot does not know a relation read: reload it, then retry
        self.detail = detail

    def __repr__(self) -> str:
        return f"ProbeResult({self.reason}, {self.fields}, stale={self.stale}, {self.detail!r})"


_PROBE_VIEW = "pgpilot_probe"
_RULE_SQL = """SELECT ev_class::int8, ev_action::text FROM pg_catalog.pg_rewrite
WHERE ev_class = ANY($1::oid[]) AND rulename = '_RETURN'"""
_CLASS_SQL = """SELECT c.oid::int8, c.relkind::text, c.relpersistence::text, c.relrowsecurity, n.nspname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1::oid[])"""
_OPERATOR_SQL = "SELECT oprcode::oid::int8 FROM pg_catalog.pg_operator WHERE oid = ANY($1::oid[])"
_PROC_SQL = """SELECT p.oid::int8, p.provolatile::text, p.prosecdef, coalesce(a.aggtransfn::oid, 0)::int8,
       coalesce(a.aggfinalfn::oid, 0)::int8, coalesce(a.aggcombinefn::oid, 0)::int8
FROM pg_catalog.pg_proc p LEFT JOIN pg_catalog.pg_aggregate a ON a.aggfnoid = p.oid WHERE p.oid = ANY($1::oid[])"""
_REG_TYPES_SQL = """SELECT count(*) FROM pg_catalog.pg_type WHERE oid = ANY($1::oid[])
AND typnamespace = 'pg_catalog'::regnamespace AND typname ~ '^_?reg'"""
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


def _substitute_params(stmt: bytes, params: list[tuple[int, int]], types: list[str]) -> bytes:
    """$n replaced by a typed NULL (parse analysis sees the same types; nothing is executed)."""
    out = stmt
    for number, offset in sorted(params, key=lambda p: -p[1]):
        token = b"$%d" % number
        if out[offset:offset + len(token)] != token or not 1 <= number <= len(types):
            raise ValueError(f"parameter ${number} not found at offset {offset}")
        out = out[:offset] + b"CAST(NULL AS " + types[number - 1].encode() + b")" + out[offset + len(token):]
    return out


async def probe(conn, sql: str, facts: S.SyntaxFacts, ctx: CacheContext, snapshot: CatalogSnapshot,
                timeout: float) -> ProbeResult:
    """Decide whether a syntactically eligible SELECT is cacheable, from Postgres' own analysis of it."""
    import asyncpg  # the proxy imports it anyway; kept local so the module loads without a database client

    raw = sql.encode("utf-8")
    stmt = raw[facts.stmt_start:facts.stmt_end]
    params = [(n, off - facts.stmt_start) for n, off in facts.params]
    ms = f"{max(1, int(timeout * 1000))}ms"
    # The client's search_path only while Postgres resolves the statement; pg_catalog for our own queries.
    await conn.execute("SELECT pg_catalog.set_config('statement_timeout', $1, false),"
                       " pg_catalog.set_config('lock_timeout', $1, false),"
                       " pg_catalog.set_config('search_path', $2, false)", ms, ctx.resolved_search_path)
    try:
        try:
            if params:
                await conn.execute("PREPARE pgpilot_probe_params AS " + stmt.decode())
                try:
                    types = await conn.fetchval("SELECT parameter_types::pg_catalog.text[]"
                                                " FROM pg_catalog.pg_prepared_statements"
                                                " WHERE name = 'pgpilot_probe_params'")
                finally:
                    await conn.execute("DEALLOCATE pgpilot_probe_params")
                stmt = _substitute_params(stmt, params, list(types or ()))
        except (asyncpg.PostgresError, ValueError) as e:
            return ProbeResult(S.ANALYSIS_ERROR, detail=str(e))
        await conn.execute("BEGIN")
        try:
            try:
                await conn.execute(
                    f"CREATE TEMP VIEW {_PROBE_VIEW} AS SELECT 1 FROM (\n{stmt.decode()}\n) AS pgpilot_q")
            except asyncpg.PostgresError as e:
                return ProbeResult(S.ANALYSIS_ERROR, detail=str(e))
            await conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")
            own, action = await conn.fetchrow(
                "SELECT ev_class::int8, ev_action::text FROM pg_catalog.pg_rewrite"
                f" WHERE ev_class = 'pg_temp.{_PROBE_VIEW}'::regclass")
            return await _judge(conn, own, action, ctx, snapshot)
        finally:
            await conn.execute("ROLLBACK")
    finally:
        await conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', false)")


async def _judge(conn, own: int, action: str, ctx: CacheContext, snapshot: CatalogSnapshot) -> ProbeResult:
    top = S.scan_node_tree(action)
    if top.reason:
        return ProbeResult(top.reason)
    functions = set(top.functions)
    operators = set(top.operators)
    types = set(top.types)
    direct = top.relations - {own}
    through_rels: set[int] = set()     # read on the role's behalf by a view's owner
    through_funcs: set[int] = set()
    classes: dict[int, tuple] = {}
    pending = set(direct)
    seen_views = {own}
    while pending:
        for r in await conn.fetch(_CLASS_SQL, list(pending)):
            classes[r[0]] = tuple(r)
        views = [oid for oid in pending if classes.get(oid, ("", "r"))[1] == "v" and oid not in seen_views]
        pending = set()
        if not views:
            break
        seen_views.update(views)
        for view_oid, view_action in await conn.fetch(_RULE_SQL, views):
            facts = S.scan_node_tree(view_action)
            if facts.reason:
                return ProbeResult(facts.reason, detail=f"in view {view_oid}")
            rels = facts.relations - {view_oid}
            through_rels |= rels
            through_funcs |= facts.functions
            operators |= facts.operators
            types |= facts.types
            pending |= rels - classes.keys()
    # Relations, as the catalog says now (the snapshot only maps them to generation fields).
    fields = set()
    for oid in direct | through_rels:
        c = classes.get(oid)
        if c is None:
            return ProbeResult(S.ANALYSIS_ERROR, detail=f"relation {oid} vanished")
        _, kind, persistence, rls, nspname = c
        if nspname in _SYSTEM_SCHEMAS:
            return ProbeResult(S.SYSTEM_CATALOG)
        if persistence == "t" or nspname.startswith(("pg_temp_", "pg_toast_temp_")):
            return ProbeResult(S.TEMP_TABLE)
        if persistence == "u":
            return ProbeResult(S.UNLOGGED)
        if kind == "S":
            return ProbeResult(S.SEQUENCE)
        if kind == "f":
            return ProbeResult(S.FOREIGN_TABLE)
        if rls:
            return ProbeResult(S.RLS)
        if kind == "v":
            continue
        rel = snapshot.by_oid.get(oid)
        if rel is None:
            return ProbeResult(None, stale=True, detail=f"relation {oid} not in the catalog snapshot")
        if rel.tree_reason:
            return ProbeResult(rel.tree_reason)
        fields.add(rel.field)
    if types and await conn.fetchval(_REG_TYPES_SQL, list(types)):
        return ProbeResult(S.CATALOG_TYPE)
    # Functions, with operators' implementations and aggregates' support functions.
    functions |= through_funcs
    if operators:
        functions |= {r[0] for r in await conn.fetch(_OPERATOR_SQL, list(operators)) if r[0]}
    checked: set[int] = set()
    todo = functions
    while todo:
        rows = await conn.fetch(_PROC_SQL, list(todo))
        checked |= todo
        todo = set()
        for oid, volatility, secdef, transfn, finalfn, combinefn in rows:
            if secdef:
                return ProbeResult(S.SECURITY_DEFINER, detail=f"function {oid}")
            if volatility != "i":
                return ProbeResult(S.VOLATILE, detail=f"function {oid} is {volatility}")
            todo |= {f for f in (transfn, finalfn, combinefn) if f and f not in checked}
    # What a view reads for the role must be readable by the role itself.
    if through_rels or through_funcs:
        ok = await conn.fetchval(
            "SELECT coalesce(bool_and(has_table_privilege($1, r, 'SELECT')), true)"
            " AND (SELECT coalesce(bool_and(has_function_privilege($1, f, 'EXECUTE')), true)"
            "      FROM unnest($3::oid[]) AS f)"
            " FROM unnest($2::oid[]) AS r",
            ctx.role, list(through_rels), list(through_funcs))
        if not ok:
            return ProbeResult(S.VIEW_PRIVILEGE)
    return ProbeResult(None, tuple(sorted(fields)))
