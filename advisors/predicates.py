"""What a statement asks of each table it reads: equality, range, join, ordering and grouping columns.

Works on the parse tree (pglast) of a normalized or literal statement, resolving aliases and unqualified
column names against the catalog, through subqueries, CTEs and correlated sublinks. The result, a
QueryShape, is what index candidates and partition signals are built from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, BoolTestType, NullTestType, SetOperation, SubLinkType

from advisors.catalog import Catalog, Table

_RANGE_OPS = {"<", "<=", ">", ">="}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "<>": "<>", "!=": "<>"}


@dataclass(frozen=True)
class Value:
    """The other side of a comparison: a parameter, a literal, a column of another table, or anything else."""
    kind: str                 # param | const | column | expr
    param: int | None = None  # $n
    text: str | None = None   # literal text, or "table.column" for a column


@dataclass(eq=False)
class TableAccess:
    """One reference to a base table in one query block (a self-join gives two)."""
    table: Table
    alias: str
    equality: dict[str, list[Value]] = field(default_factory=dict)   # col = value / col IN (...)
    ranges: dict[str, list[tuple[str, Value]]] = field(default_factory=dict)  # col <op> value, BETWEEN
    joins: dict[str, list[Value]] = field(default_factory=dict)      # col = column of another table
    likes: dict[str, list[Value]] = field(default_factory=dict)
    nulls: dict[str, bool] = field(default_factory=dict)            # col -> IS NULL (True) / IS NOT NULL
    booleans: dict[str, bool] = field(default_factory=dict)         # WHERE flag / NOT flag / flag = true
    order_by: list[tuple[str, bool]] = field(default_factory=list)  # (col, descending)
    group_by: list[str] = field(default_factory=list)
    referenced: set[str] = field(default_factory=set)
    star: bool = False
    limited: bool = False     # the query block has a LIMIT

    @property
    def name(self) -> str:
        return self.table.qualified

    def filter_columns(self) -> set[str]:
        return set(self.equality) | set(self.ranges) | set(self.joins)


@dataclass
class QueryShape:
    kind: str
    accesses: list[TableAccess] = field(default_factory=list)
    params: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # $n -> (table, column, operator)
    limit_params: set[int] = field(default_factory=set)                    # $n in LIMIT / OFFSET
    written_table: Table | None = None
    updated_columns: set[str] = field(default_factory=set)
    unresolved: set[str] = field(default_factory=set)   # relations not found in the catalog (views, CTEs...)

    @property
    def tables(self) -> set[str]:
        names = {a.name for a in self.accesses}
        if self.written_table is not None:
            names.add(self.written_table.qualified)
        return names

    def accesses_of(self, table: str) -> list[TableAccess]:
        return [a for a in self.accesses if a.name == table]


class _Scope:
    def __init__(self) -> None:
        self.entries: dict[str, TableAccess | None] = {}  # alias -> access (None: subquery, CTE, function)


def _opname(expr: ast.A_Expr) -> str:
    return expr.name[-1].sval if expr.name else ""


def _strip_cast(node):
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return node


def _const_text(node: ast.A_Const) -> str | None:
    if node.isnull:
        return None
    val = node.val
    for attr in ("sval", "ival", "fval", "boolval", "bsval"):
        if hasattr(val, attr):
            v = getattr(val, attr)
            return str(v).lower() if isinstance(v, bool) else str(v)
    return None


class _Analyzer:
    def __init__(self, catalog: Catalog, shape: QueryShape):
        self.catalog = catalog
        self.shape = shape

    # -- resolution ------------------------------------------------------------------------------------------
    def resolve(self, ref: ast.ColumnRef, scopes: list[_Scope]) -> tuple[TableAccess | None, str | None]:
        names = [f.sval for f in ref.fields if isinstance(f, ast.String)]
        star = any(isinstance(f, ast.A_Star) for f in ref.fields)
        if star:  # t.* or *: every column of those tables is needed, so no index can cover the query
            if scopes:
                scope = scopes[0]
                targets = [scope.entries.get(names[-1])] if names else list(scope.entries.values())
                for access in targets:
                    if access is not None:
                        access.star = True
            return None, None
        if not names:
            return None, None
        col = names[-1]
        if len(names) >= 2:
            alias = names[-2]
            for scope in scopes:
                if alias in scope.entries:
                    access = scope.entries[alias]
                    if access is not None and col in access.table.columns:
                        return access, col
                    return None, None
            return None, None
        for scope in scopes:
            for access in scope.entries.values():
                if access is not None and col in access.table.columns:
                    return access, col
            if any(a is None for a in scope.entries.values()):
                # An opaque entry (subquery, CTE) in this block may own the name: stop looking outwards.
                return None, None
        return None, None

    def column(self, node, scopes) -> tuple[TableAccess | None, str | None]:
        node = _strip_cast(node)
        if isinstance(node, ast.ColumnRef):
            return self.resolve(node, scopes)
        return None, None

    def value(self, node, scopes) -> Value:
        node = _strip_cast(node)
        if isinstance(node, ast.ParamRef):
            return Value("param", param=node.number)
        if isinstance(node, ast.A_Const):
            return Value("const", text=_const_text(node))
        if isinstance(node, ast.ColumnRef):
            access, col = self.resolve(node, scopes)
            return Value("column", text=f"{access.name}.{col}" if access else None)
        return Value("expr")

    # -- statements ----------------------------------------------------------------------------------------
    def statement(self, stmt) -> None:
        if isinstance(stmt, ast.SelectStmt):
            self.select(stmt, [], set())
        elif isinstance(stmt, ast.InsertStmt):
            self.shape.written_table = self.catalog.resolve(self._rv_name(stmt.relation))
            ctes = self.with_clause(stmt.withClause, [], set())
            if stmt.selectStmt is not None:
                self.select(stmt.selectStmt, [], ctes)
        elif isinstance(stmt, (ast.UpdateStmt, ast.DeleteStmt)):
            ctes = self.with_clause(stmt.withClause, [], set())
            scope = _Scope()
            target = self.catalog.resolve(self._rv_name(stmt.relation))
            self.shape.written_table = target
            if target is not None:
                alias = stmt.relation.alias.aliasname if stmt.relation.alias else stmt.relation.relname
                access = TableAccess(target, alias)
                self.shape.accesses.append(access)
                scope.entries[alias] = access
            quals: list = []
            extra = stmt.fromClause if isinstance(stmt, ast.UpdateStmt) else stmt.usingClause
            for item in extra or ():
                self.from_item(item, scope, [], ctes, quals)
            scopes = [scope]
            for q in quals + self.conjuncts(stmt.whereClause):
                self.predicate(q, scopes, ctes)
            if isinstance(stmt, ast.UpdateStmt):
                for target_item in stmt.targetList or ():
                    self.shape.updated_columns.add(target_item.name)
                    self.walk(target_item.val, scopes, ctes)
            for r in stmt.returningList or ():
                self.walk(r, scopes, ctes)

    @staticmethod
    def _rv_name(rv: ast.RangeVar) -> str:
        return f"{rv.schemaname}.{rv.relname}" if rv.schemaname else rv.relname

    def with_clause(self, with_clause, outer, ctes: set[str]) -> set[str]:
        ctes = set(ctes)
        if with_clause is not None:
            for cte in with_clause.ctes:
                ctes.add(cte.ctename)
                if isinstance(cte.ctequery, ast.SelectStmt):
                    self.select(cte.ctequery, outer, ctes)
                else:
                    self.statement(cte.ctequery)
        return ctes

    def select(self, node: ast.SelectStmt, outer: list[_Scope], ctes: set[str]) -> None:
        ctes = self.with_clause(node.withClause, outer, ctes)
        if node.op != SetOperation.SETOP_NONE:
            self.select(node.larg, outer, ctes)
            self.select(node.rarg, outer, ctes)
            return
        if node.valuesLists:
            for row in node.valuesLists:
                self.walk(row, outer, ctes)
            return
        scope = _Scope()
        quals: list = []
        for item in node.fromClause or ():
            self.from_item(item, scope, outer, ctes, quals)
        scopes = [scope] + outer
        for q in quals + self.conjuncts(node.whereClause):
            self.predicate(q, scopes, ctes)
        for target in node.targetList or ():
            self.walk(target.val, scopes, ctes)
        self.walk(node.havingClause, scopes, ctes)
        limited = node.limitCount is not None
        for clause in (node.limitCount, node.limitOffset):
            if isinstance(_strip_cast(clause), ast.ParamRef):
                self.shape.limit_params.add(_strip_cast(clause).number)
        for g in node.groupClause or ():
            access, col = self.column(g, scopes)
            if access is not None:
                access.group_by.append(col)
                access.referenced.add(col)
            else:
                self.walk(g, scopes, ctes)
        for s in node.sortClause or ():
            access, col = self.column(s.node, scopes)
            if access is not None:
                access.order_by.append((col, s.sortby_dir == 2))
                access.referenced.add(col)
            else:
                self.walk(s.node, scopes, ctes)
        if limited:
            for access in scope.entries.values():
                if access is not None:
                    access.limited = True

    def from_item(self, item, scope: _Scope, outer: list[_Scope], ctes: set[str], quals: list) -> None:
        if isinstance(item, ast.RangeVar):
            alias = item.alias.aliasname if item.alias else item.relname
            if item.schemaname is None and item.relname in ctes:
                scope.entries[alias] = None
                return
            table = self.catalog.resolve(self._rv_name(item))
            if table is None:
                self.shape.unresolved.add(self._rv_name(item))
                scope.entries[alias] = None
                return
            access = TableAccess(table, alias)
            self.shape.accesses.append(access)
            scope.entries[alias] = access
        elif isinstance(item, ast.JoinExpr):
            self.from_item(item.larg, scope, outer, ctes, quals)
            self.from_item(item.rarg, scope, outer, ctes, quals)
            if item.quals is not None:
                quals.extend(self.conjuncts(item.quals))
            for using in item.usingClause or ():
                owners = [a for a in scope.entries.values() if a is not None and using.sval in a.table.columns]
                for a in owners:
                    others = [Value("column", text=f"{o.name}.{using.sval}") for o in owners if o is not a]
                    a.joins.setdefault(using.sval, []).extend(others)
                    a.referenced.add(using.sval)
            if item.alias is not None:
                scope.entries[item.alias.aliasname] = None
        elif isinstance(item, ast.RangeSubselect):
            self.select(item.subquery, ([scope] if item.lateral else []) + outer, ctes)
            if item.alias is not None:
                scope.entries[item.alias.aliasname] = None
        else:  # functions, table samples, XML tables: their arguments may still reference columns
            self.walk(item, [scope] + outer, ctes)
            alias = getattr(item, "alias", None)
            if alias is not None:
                scope.entries[alias.aliasname] = None

    @staticmethod
    def conjuncts(node) -> list:
        if node is None:
            return []
        if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
            out = []
            for arg in node.args:
                out.extend(_Analyzer.conjuncts(arg))
            return out
        return [node]

    # -- predicates ------------------------------------------------------------------------------------------
    def predicate(self, node, scopes: list[_Scope], ctes: set[str]) -> None:
        if isinstance(node, ast.BoolExpr):
            if node.boolop == BoolExprType.OR_EXPR:
                self.disjunction(node, scopes, ctes)
                return
            if node.boolop == BoolExprType.NOT_EXPR:
                access, col = self.column(node.args[0], scopes)
                if access is not None and access.table.columns[col].type == "boolean":
                    access.booleans[col] = False
                    access.referenced.add(col)
                    return
            self.walk(node, scopes, ctes)
            return
        if isinstance(node, ast.ColumnRef):
            access, col = self.resolve(node, scopes)
            if access is not None:
                access.referenced.add(col)
                if access.table.columns[col].type == "boolean":
                    access.booleans[col] = True
            return
        if isinstance(node, ast.NullTest):
            access, col = self.column(node.arg, scopes)
            if access is not None:
                access.nulls[col] = node.nulltesttype == NullTestType.IS_NULL
                access.referenced.add(col)
            else:
                self.walk(node.arg, scopes, ctes)
            return
        if isinstance(node, ast.BooleanTest):
            access, col = self.column(node.arg, scopes)
            if access is not None and node.booltesttype in (BoolTestType.IS_TRUE, BoolTestType.IS_FALSE):
                access.booleans[col] = node.booltesttype == BoolTestType.IS_TRUE
                access.referenced.add(col)
            else:
                self.walk(node.arg, scopes, ctes)
            return
        if isinstance(node, ast.SubLink):
            self.sublink(node, scopes, ctes)
            return
        if isinstance(node, ast.A_Expr):
            self.comparison(node, scopes, ctes)
            return
        self.walk(node, scopes, ctes)

    def comparison(self, node: ast.A_Expr, scopes, ctes) -> None:
        kind, op = node.kind, _opname(node)
        if kind == A_Expr_Kind.AEXPR_OP and op in ("=", "<", "<=", ">", ">=") and node.lexpr is not None:
            left, lcol = self.column(node.lexpr, scopes)
            right, rcol = self.column(node.rexpr, scopes)
            if left is not None and right is not None:
                if left is not right and op == "=":
                    left.joins.setdefault(lcol, []).append(Value("column", text=f"{right.name}.{rcol}"))
                    right.joins.setdefault(rcol, []).append(Value("column", text=f"{left.name}.{lcol}"))
                left.referenced.add(lcol)
                right.referenced.add(rcol)
                return
            if left is None and right is not None:
                left, lcol, op, other = right, rcol, _FLIP[op], node.lexpr
            else:
                other = node.rexpr
            if left is None:
                self.walk(node, scopes, ctes)
                return
            left.referenced.add(lcol)
            value = self.value(other, scopes)
            if value.kind == "expr":
                self.walk(other, scopes, ctes)
            if op == "=":
                left.equality.setdefault(lcol, []).append(value)
            else:
                left.ranges.setdefault(lcol, []).append((op, value))
            if value.kind == "param":
                self.shape.params[value.param] = (left.name, lcol, op)
            return
        if kind == A_Expr_Kind.AEXPR_IN and op == "=":
            access, col = self.column(node.lexpr, scopes)
            if access is not None:
                access.referenced.add(col)
                for item in node.rexpr:
                    value = self.value(item, scopes)
                    access.equality.setdefault(col, []).append(value)
                    if value.kind == "param":
                        self.shape.params[value.param] = (access.name, col, "in")
                return
        if kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM):
            access, col = self.column(node.lexpr, scopes)
            if access is not None:
                access.referenced.add(col)
                for op_, item in zip((">=", "<="), node.rexpr):
                    value = self.value(item, scopes)
                    access.ranges.setdefault(col, []).append((op_, value))
                    if value.kind == "param":
                        self.shape.params[value.param] = (access.name, col, op_)
                return
        if kind in (A_Expr_Kind.AEXPR_LIKE, A_Expr_Kind.AEXPR_ILIKE) and op in ("~~", "~~*"):
            access, col = self.column(node.lexpr, scopes)
            if access is not None:
                access.referenced.add(col)
                value = self.value(node.rexpr, scopes)
                access.likes.setdefault(col, []).append(value)
                if value.kind == "param":
                    self.shape.params[value.param] = (access.name, col, "like")
                return
        self.walk(node, scopes, ctes)

    def disjunction(self, node: ast.BoolExpr, scopes, ctes) -> None:
        """Facts true in every branch of an OR hold for the whole; the rest only marks columns referenced."""
        branch_facts = []
        for arg in node.args:
            probe = QueryShape(self.shape.kind)
            sub = _Analyzer(self.catalog, probe)
            shadow = [self._shadow(s) for s in scopes]
            for conj in self.conjuncts(arg):
                sub.predicate(conj, shadow, ctes)
            self.shape.accesses.extend(probe.accesses)  # tables of subqueries inside the branch
            self.shape.params.update(probe.params)
            facts = {}
            for s_orig, s_shadow in zip(scopes, shadow):
                for alias, shadow_access in s_shadow.entries.items():
                    real = s_orig.entries.get(alias)
                    if real is None or shadow_access is None:
                        continue
                    real.referenced |= shadow_access.referenced
                    real.star = real.star or shadow_access.star
                    for attr in ("equality", "ranges", "joins"):
                        for col, vals in getattr(shadow_access, attr).items():
                            facts.setdefault((id(real), attr, col), (real, vals))
            branch_facts.append(facts)
        if not branch_facts:
            return
        common = set(branch_facts[0])
        for facts in branch_facts[1:]:
            common &= set(facts)
        for key in common:
            real, _ = branch_facts[0][key]
            _, attr, col = key
            merged = [v for facts in branch_facts for v in facts[key][1]]
            getattr(real, attr).setdefault(col, []).extend(merged)

    @staticmethod
    def _shadow(scope: _Scope) -> _Scope:
        """A copy of a scope with fresh accesses, to collect one OR branch's facts apart."""
        shadow = _Scope()
        for alias, access in scope.entries.items():
            shadow.entries[alias] = TableAccess(access.table, access.alias) if access is not None else None
        return shadow

    def sublink(self, node: ast.SubLink, scopes, ctes) -> None:
        if node.subLinkType == SubLinkType.ANY_SUBLINK and node.testexpr is not None:
            access, col = self.column(node.testexpr, scopes)
            if access is not None:  # col IN (SELECT ...): a semi-join on col
                access.joins.setdefault(col, []).append(Value("expr"))
                access.referenced.add(col)
            else:
                self.walk(node.testexpr, scopes, ctes)
        elif node.testexpr is not None:
            self.walk(node.testexpr, scopes, ctes)
        if isinstance(node.subselect, ast.SelectStmt):
            self.select(node.subselect, scopes, ctes)

    def param_types_from(self, node: ast.A_Expr, scopes) -> None:
        """`col = $n` outside a filter (CASE WHEN, select list) still tells which column $n is compared with."""
        sides = [node.lexpr] + (list(node.rexpr) if isinstance(node.rexpr, tuple) else [node.rexpr])
        access, col = self.column(sides[0], scopes)
        others = sides[1:]
        if access is None and len(sides) == 2:
            access, col = self.column(sides[1], scopes)
            others = sides[:1]
        if access is None:
            return
        for other in others:
            other = _strip_cast(other)
            if isinstance(other, ast.ParamRef) and other.number not in self.shape.params:
                self.shape.params[other.number] = (access.name, col, "expr")

    # -- everything else -------------------------------------------------------------------------------------
    def walk(self, node, scopes, ctes) -> None:
        """Mark every column referenced below `node`, analysing sublinks as nested query blocks."""
        if node is None:
            return
        if isinstance(node, tuple):
            for item in node:
                self.walk(item, scopes, ctes)
            return
        if not isinstance(node, ast.Node):
            return
        if isinstance(node, ast.ColumnRef):
            access, col = self.resolve(node, scopes)
            if access is not None:
                access.referenced.add(col)
            return
        if isinstance(node, ast.SubLink):
            self.sublink(node, scopes, ctes)
            return
        if isinstance(node, ast.SelectStmt):
            self.select(node, scopes, ctes)
            return
        if isinstance(node, ast.A_Expr) and node.kind in (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_IN):
            self.param_types_from(node, scopes)
        for name in node:
            self.walk(getattr(node, name), scopes, ctes)


_KINDS = {ast.SelectStmt: "select", ast.InsertStmt: "insert", ast.UpdateStmt: "update",
          ast.DeleteStmt: "delete"}


def analyze(sql: str, catalog: Catalog) -> QueryShape | None:
    """The shape of the first statement in `sql`, or None when it is not a query the advisors can use."""
    try:
        stmts = parse_sql(sql)
    except Exception:
        return None
    if not stmts:
        return None
    stmt = stmts[0].stmt
    kind = _KINDS.get(type(stmt))
    if kind is None:
        return None
    shape = QueryShape(kind)
    _Analyzer(catalog, shape).statement(stmt)
    return shape
