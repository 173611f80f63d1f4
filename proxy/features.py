"""Feature extraction shared by the proxy (serving) and the learner (training): one event dict in, one row out.

Both sides call `transform_one(x, kind)` on the same kind of dict, so a model never sees features computed
differently from those it was trained on. Statement features are computed from the statement's shape (its
text with every constant and parameter replaced by one placeholder), so a raw statement and its normalized
form give the same row; per-text results are cached. Imports only the standard library, numpy and pglast:
the proxy imports this module.

The input dict (every key optional):
    sql              statement text, raw or normalized ($n placeholders)
    parameters       literal values / bound parameters as text (None when not logged)
    ts               statement start, epoch seconds
    template         TemplateStats of the statement's fingerprint (None for a template never seen)
    duration_us, rows, bytes_out, sqlstate          what happened (anomaly scoring only)
    application_name, app_known, client_known, client_recent_errors   who sent it (anomaly scoring only)
ServingContext.prepare() fills template / app_known / client_known / client_recent_errors from a
learner-exported context, identically for training and serving.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import struct
from collections import deque
from functools import lru_cache

import numpy as np
from pglast import parser as pg_parser

# Bump whenever a feature's meaning, order or computation changes: models trained on another version are refused.
FEATURE_VERSION = 4

_CONST_TOKENS = frozenset({"SCONST", "ICONST", "FCONST", "BCONST", "XCONST", "USCONST"})
_COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})
_PLACEHOLDER = "'?'"
_AGGREGATES = frozenset({
    "count", "sum", "avg", "min", "max", "stddev", "stddev_samp", "stddev_pop", "variance", "var_samp",
    "var_pop", "array_agg", "string_agg", "json_agg", "jsonb_agg", "bool_and", "bool_or", "every",
    "percentile_cont", "percentile_disc", "mode", "corr", "covar_pop", "covar_samp", "regr_slope",
    "json_object_agg", "jsonb_object_agg", "xmlagg", "bit_and", "bit_or",
})
# Functions that ordinary application statements rarely call but probes and exfiltration attempts do.
_SUSPICIOUS_FUNCS = frozenset({
    "pg_sleep", "sleep", "benchmark", "version", "current_user", "session_user", "current_database",
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "lo_import", "lo_export", "dblink", "dblink_exec",
    "inet_server_addr", "inet_server_port", "pg_stat_file", "query_to_xml", "database_to_xml", "chr",
    "pg_sleep_for", "pg_sleep_until", "current_setting", "set_config", "load_file", "user",
})
_CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_COMPARISONS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "like", "~~", "ilike", "~~*"})
_KIND_BY_NODE = {
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete",
    "MergeStmt": "merge", "TransactionStmt": "transaction", "VariableSetStmt": "set", "CopyStmt": "copy",
}
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Truncate", "Rename", "Comment", "Grant", "Index", "View")

_PARAM_SLOTS = 4  # parameters whose values become features; later ones count only towards the oddity totals
_DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2}(?:\.\d+)?))?)?")
_PARAM_META_RE = re.compile(r"--|/\*|\*/|;")
_PARAM_KEYWORD_RE = re.compile(r"\b(or|and|union|select|drop|insert|delete|update|sleep|benchmark|null)\b", re.I)
_PARAM_TAUTOLOGY_RE = re.compile(r"'\s*(or|and)\s+'?\s*\w*\s*'?\s*(=|like|<>)", re.I)


# ---------------------------------------------------------------------------------------------
# Normalization: constants -> $n, as pg_query's normalize does, plus the literal values in order.

@lru_cache(maxsize=20_000)
def normalize(sql: str) -> tuple[str, tuple[str, ...]]:
    """The statement with each constant replaced by $n (numbered after any $n already present), and the values.

    Token based (pglast's C scanner), so it also works on statements that do not parse. Booleans and NULL stay
    as written; a leading minus stays an operator. Raises nothing: an unscannable text comes back unchanged.
    """
    try:
        tokens = pg_parser.scan(sql)
    except Exception:
        return sql, ()
    highest = 0
    for t in tokens:
        if t.name == "PARAM":
            highest = max(highest, int(sql[t.start + 1:t.end + 1] or 0))
    out: list[str] = []
    values: list[str] = []
    pos = 0
    n = highest
    for t in tokens:
        if t.name in _CONST_TOKENS:
            n += 1
            out.append(sql[pos:t.start])
            out.append(f"${n}")
            values.append(_literal_value(t.name, sql[t.start:t.end + 1]))
            pos = t.end + 1
    out.append(sql[pos:])
    return "".join(out), tuple(values)


def _literal_value(token: str, text: str) -> str:
    if token in ("ICONST", "FCONST"):
        return text
    if text.startswith("$"):  # dollar quoting: $tag$...$tag$
        tag_end = text.index("$", 1) + 1
        return text[tag_end:len(text) - tag_end]
    if text[:1] in "eE" and text[1:2] == "'":
        body = text[2:-1].replace("''", "'")
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)
    if text[:2] in ("U&", "u&"):
        return text[3:-1].replace("''", "'")
    if text[:1] in "bBxXnN" and text[1:2] == "'":
        return text[2:-1]
    return text[1:-1].replace("''", "'")


def _shape_text(sql: str, tokens) -> str:
    """Every constant and $n replaced by one placeholder literal: raw and normalized texts share a shape."""
    out: list[str] = []
    pos = 0
    for t in tokens:
        if t.name in _CONST_TOKENS or t.name == "PARAM":
            out.append(sql[pos:t.start])
            out.append(_PLACEHOLDER)
            pos = t.end + 1
    out.append(sql[pos:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Statement features

STATEMENT_FEATURES = (
    "stmt_is_select", "stmt_is_insert", "stmt_is_update", "stmt_is_delete", "stmt_is_ddl", "stmt_is_other",
    "stmt_for_update", "stmt_tables", "stmt_joins", "stmt_predicates", "stmt_or_terms", "stmt_aggregates",
    "stmt_group_by", "stmt_having", "stmt_order_by", "stmt_limit", "stmt_distinct", "stmt_subqueries",
    "stmt_depth", "stmt_ctes", "stmt_set_ops", "stmt_windows", "stmt_target_cols", "stmt_star",
    "stmt_in_list_max", "stmt_constants", "stmt_length_log",
    # injection-shape features
    "inj_const_comparisons", "inj_statements", "inj_comments", "inj_union", "inj_union_nulls",
    "inj_suspicious_funcs", "inj_catalog", "inj_parse_error",
)


class _Walk:
    """Counters filled by one pass over a pg_query JSON tree."""

    __slots__ = ("tables", "joins", "predicates", "or_terms", "aggregates", "group_by", "having", "order_by",
                 "limit", "distinct", "selects", "depth", "ctes", "set_ops", "windows", "star", "in_list_max",
                 "const_comparisons", "union", "union_nulls", "suspicious", "catalog", "for_update")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def visit(self, node, depth: int) -> None:
        if isinstance(node, list):
            for item in node:
                self.visit(item, depth)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key == "SelectStmt":
                self._select(value, depth + 1)
                self.visit(value, depth + 1)
            elif isinstance(value, (dict, list)):
                self._node(key, value)
                self.visit(value, depth)

    def _select(self, s: dict, depth: int) -> None:
        self.selects += 1
        self.depth = max(self.depth, depth)
        op = s.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            self.set_ops += 1
            if op == "SETOP_UNION":
                self.union += 1
            for arm in (s.get("larg"), s.get("rarg")):
                for target in (arm or {}).get("targetList", []):
                    val = target.get("ResTarget", {}).get("val", {})
                    if val.get("A_Const", {}).get("isnull"):
                        self.union_nulls += 1
        frm = s.get("fromClause") or []
        if len(frm) > 1:
            self.joins += len(frm) - 1
        self.group_by += bool(s.get("groupClause"))
        self.having += bool(s.get("havingClause"))
        self.order_by += bool(s.get("sortClause"))
        self.limit += bool(s.get("limitCount"))
        self.distinct += bool(s.get("distinctClause"))
        self.for_update += bool(s.get("lockingClause"))

    def _node(self, key: str, value) -> None:
        if not isinstance(value, dict):
            return
        if key == "RangeVar":
            self.tables += 1
            rel = value.get("relname", "")
            if value.get("schemaname") in _CATALOG_SCHEMAS or rel.startswith("pg_"):
                self.catalog += 1
        elif key == "JoinExpr":
            self.joins += 1
        elif key == "A_Expr":
            self.predicates += 1
            names = value.get("name") or []
            op = names[-1].get("String", {}).get("sval", "") if names else ""
            if value.get("kind") == "AEXPR_IN":
                items = value.get("rexpr", {}).get("List", {}).get("items", [])
                self.in_list_max = max(self.in_list_max, len(items))
            elif op.lower() in _COMPARISONS and "A_Const" in (value.get("lexpr") or {}) \
                    and "A_Const" in (value.get("rexpr") or {}):
                self.const_comparisons += 1
        elif key in ("NullTest", "BooleanTest"):
            self.predicates += 1
        elif key == "BoolExpr":
            args = value.get("args") or []
            if value.get("boolop") == "OR_EXPR":
                self.or_terms += len(args)
                # `... OR 'x'` / `... OR true`: a bare constant as a disjunct is always-true shaped
                self.const_comparisons += sum(1 for a in args if "A_Const" in a)
        elif key == "FuncCall":
            names = value.get("funcname") or []
            fname = names[-1].get("String", {}).get("sval", "").lower() if names else ""
            if value.get("over") is not None:
                self.windows += 1
            elif fname in _AGGREGATES or value.get("agg_star"):
                self.aggregates += 1
            if fname in _SUSPICIOUS_FUNCS:
                self.suspicious += 1
        elif key == "SQLValueFunction":
            if value.get("op", "") in ("SVFOP_CURRENT_USER", "SVFOP_SESSION_USER", "SVFOP_USER",
                                       "SVFOP_CURRENT_ROLE"):
                self.suspicious += 1
        elif key == "CommonTableExpr":
            self.ctes += 1
        elif key == "A_Star":
            self.star += 1


def _statement_kind(stmt_node: dict) -> str:
    name = next(iter(stmt_node), "")
    if name in _KIND_BY_NODE:
        return _KIND_BY_NODE[name]
    if name.startswith(_DDL_PREFIXES):
        return "ddl"
    return "other"


def statement_kind(sql: str) -> str:
    """select, insert, update, delete, merge, ddl, copy, transaction, set or other (of the first statement)."""
    return _statement_analysis(sql)[1]


def statement_tables(sql: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tables read, tables written) named by the statement, schema-qualified as written."""
    return _statement_analysis(sql)[2]


def statement_features(sql: str) -> tuple[float, ...]:
    """The STATEMENT_FEATURES of a statement (raw or normalized: both give the same values)."""
    return _statement_analysis(sql)[0]


@lru_cache(maxsize=20_000)
def _statement_analysis(sql: str) -> tuple[tuple[float, ...], str, tuple[tuple[str, ...], tuple[str, ...]]]:
    try:
        tokens = pg_parser.scan(sql)
    except Exception:
        tokens = None
    comments = semicolons = constants = 0
    shape = sql
    if tokens is not None:
        last_significant = None
        for t in tokens:
            if t.name in _COMMENT_TOKENS:
                comments += 1
            elif t.name in _CONST_TOKENS or t.name == "PARAM":
                constants += 1
            if t.name not in _COMMENT_TOKENS:
                last_significant = t
            if t.name == "ASCII_59":
                semicolons += 1
        if last_significant is not None and last_significant.name == "ASCII_59":
            semicolons -= 1  # a trailing semicolon ends a statement, it does not stack one
        shape = _shape_text(sql, tokens)
    else:
        comments = sql.count("--") + sql.count("/*")
        semicolons = sql.rstrip().rstrip(";").count(";")
    walk = _Walk()
    kind = "other"
    read: set[str] = set()
    written: set[str] = set()
    parse_error = 0
    n_statements = semicolons + 1
    target_cols = 0
    try:
        tree = json.loads(pg_parser.parse_sql_json(shape))
        stmts = tree.get("stmts", [])
        n_statements = max(1, len(stmts))
        for i, raw in enumerate(stmts):
            stmt = raw.get("stmt", {})
            if i == 0:
                kind = _statement_kind(stmt)
                body = stmt.get(next(iter(stmt), ""), {})
                if isinstance(body, dict):
                    target_cols = len(body.get("targetList") or body.get("returningList") or [])
            walk.visit(stmt, 0)
            _collect_tables(stmt, read, written)
    except Exception:
        parse_error = 1
        kind = _kind_from_text(sql)
    kinds = ("select", "insert", "update", "delete")
    values = [float(kind == k) for k in kinds]
    values.append(float(kind == "ddl"))
    values.append(float(kind not in kinds and kind != "ddl"))
    values += [
        walk.for_update, walk.tables, walk.joins, walk.predicates, walk.or_terms, walk.aggregates,
        walk.group_by, walk.having, walk.order_by, walk.limit, walk.distinct, max(0, walk.selects - 1),
        walk.depth, walk.ctes, walk.set_ops, walk.windows, target_cols,
        walk.star, walk.in_list_max, constants, math.log1p(sum(not c.isspace() for c in shape)),
        walk.const_comparisons, n_statements, comments, walk.union, walk.union_nulls, walk.suspicious,
        walk.catalog, parse_error,
    ]
    return tuple(float(v) for v in values), kind, (tuple(sorted(read - written)), tuple(sorted(written)))


def _kind_from_text(sql: str) -> str:
    word = sql.lstrip().split(None, 1)[0].lower() if sql.strip() else ""
    word = word.lstrip("(")
    if word in ("select", "with", "values", "table"):
        return "select"
    if word in ("insert", "update", "delete", "merge", "copy", "set"):
        return word
    if word in ("begin", "commit", "rollback", "start", "end", "savepoint", "release", "abort"):
        return "transaction"
    if word in ("create", "alter", "drop", "truncate", "grant", "revoke", "comment"):
        return "ddl"
    return "other"


def _relname(rv: dict) -> str:
    return f"{rv['schemaname']}.{rv['relname']}" if rv.get("schemaname") else rv.get("relname", "")


def _collect_tables(stmt: dict, read: set, written: set) -> None:
    name = next(iter(stmt), "")
    body = stmt.get(name, {})
    if isinstance(body, dict):
        target = body.get("relation")
        if name in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt") and isinstance(target, dict):
            written.add(_relname(target))
        elif name == "TruncateStmt":
            for rel in body.get("relations", []):
                written.add(_relname(rel.get("RangeVar", {})))
    stack = [stmt]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "RangeVar" and isinstance(value, dict):
                    read.add(_relname(value))
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


# ---------------------------------------------------------------------------------------------
# Parameter features

PARAM_FEATURES = (
    "par_present", "par_count", *(f"par_v{i}" for i in range(_PARAM_SLOTS)),
    *(f"par_d{i}{i + 1}" for i in range(_PARAM_SLOTS - 1)),
    "par_max_len_log", "par_quotes", "par_sql_meta", "par_keywords", "par_tautology",
)


def _slog(v: float) -> float:
    return math.copysign(math.log1p(abs(v)), v)


def param_number(value: str | None) -> float | None:
    """A parameter as a number: numbers as themselves, dates/timestamps as days since 1970, booleans as 0/1."""
    if value is None:
        return None
    v = value.strip()
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except ValueError:
        pass
    m = _DATE_RE.match(v)
    if m:
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        try:
            days = _days_from_civil(y, mo, d)
        except ValueError:
            return None
        if m.group(4):
            days += (int(m.group(4)) * 3600 + int(m.group(5)) * 60 + float(m.group(6) or 0)) / 86400.0
        return days
    lower = v.lower()
    if lower in ("t", "true"):
        return 1.0
    if lower in ("f", "false"):
        return 0.0
    return None


_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def _days_from_civil(y: int, m: int, d: int) -> float:
    return float(datetime.date(y, m, d).toordinal() - _EPOCH_ORDINAL)


@lru_cache(maxsize=50_000)
def param_features(params: tuple | None) -> tuple[float, ...]:
    """The PARAM_FEATURES of a parameter tuple (None: parameters were not logged)."""
    if params is None:
        return (0.0,) * len(PARAM_FEATURES)
    nums = [param_number(p) for p in params[:_PARAM_SLOTS]]
    values = [1.0, float(len(params))]
    values += [_slog(n) if n is not None else (-1.0 - math.log1p(len(params[i] or ""))) for i, n in enumerate(nums)]
    values += [0.0] * (_PARAM_SLOTS - len(nums))
    for i in range(_PARAM_SLOTS - 1):
        a = nums[i] if i < len(nums) else None
        b = nums[i + 1] if i + 1 < len(nums) else None
        values.append(_slog(b - a) if a is not None and b is not None else 0.0)
    texts = [p for p in params if p is not None]
    values.append(math.log1p(max((len(p) for p in texts), default=0)))
    values.append(float(sum(p.count("'") for p in texts)))
    values.append(float(sum(len(_PARAM_META_RE.findall(p)) for p in texts)))
    values.append(float(sum(1 for p in texts if _PARAM_KEYWORD_RE.search(p) and not p.isalnum())))
    values.append(float(sum(1 for p in texts if _PARAM_TAUTOLOGY_RE.search(p))))
    return tuple(values)


# ---------------------------------------------------------------------------------------------
# Template history, plan and table statistics

class TemplateStats:
    """What the learner knows about one template (fingerprint) from the log, plans and table statistics."""

    FIELDS = (
        "calls", "calls_per_hour", "mean_us", "p50_us", "p95_us", "mad_log_us", "rows_p50", "rows_mad_log",
        "bytes_p50", "bytes_mad_log", "error_rate", "key_ratio", "first_seen", "n_apps", "app_share",
        "write_rate", "tables_bytes", "tables_rows", "plan_cost", "plan_rows", "plan_width", "plan_nodes",
        "time_fit", "time_fit_rows", "key_times",
    )
    __slots__ = FIELDS + ("_vector", "_fits")

    def __init__(self, **values):
        for name in self.FIELDS:
            setattr(self, name, values.get(name))
        if self.app_share is None:
            self.app_share = {}
        self._vector = None
        self._fits = None

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "TemplateStats":
        return cls(**{k: v for k, v in d.items() if k in cls.FIELDS})

    def vector(self) -> tuple[float, ...]:
        if self._vector is None:
            self._vector = _template_vector(self)
        return self._vector


HISTORY_FEATURES = (
    "hist_known", "hist_calls_log", "hist_rate_log", "hist_mean_log_us", "hist_p50_log_us", "hist_p95_log_us",
    "hist_mad_log_us", "hist_rows_p50_log", "hist_rows_mad_log", "hist_bytes_p50_log", "hist_bytes_mad_log",
    "hist_error_rate", "hist_key_ratio", "hist_apps",
)
PLAN_FEATURES = (
    "plan_present", "plan_cost_log", "plan_rows_log", "plan_width", "plan_seq_scans", "plan_index_scans",
    "plan_joins", "plan_sorts", "plan_aggs", "plan_nodes",
)
TABLE_FEATURES = ("tbl_bytes_log", "tbl_rows_log", "tbl_write_rate_log")


def _lg(v) -> float:
    return math.log1p(max(0.0, float(v))) if v is not None else 0.0


def _template_vector(t: TemplateStats) -> tuple[float, ...]:
    hist = [1.0, _lg(t.calls), _lg(t.calls_per_hour), _lg(t.mean_us), _lg(t.p50_us), _lg(t.p95_us),
            float(t.mad_log_us or 0.0), _lg(t.rows_p50), float(t.rows_mad_log or 0.0), _lg(t.bytes_p50),
            float(t.bytes_mad_log or 0.0), float(t.error_rate or 0.0),
            float(t.key_ratio) if t.key_ratio is not None else -1.0, float(t.n_apps or 0)]
    nodes = [n.lower() for n in (t.plan_nodes or [])]
    if t.plan_cost is not None:
        plan = [1.0, _lg(t.plan_cost), _lg(t.plan_rows), float(t.plan_width or 0),
                float(sum("seq scan" in n for n in nodes)),
                float(sum("index" in n for n in nodes)),
                float(sum(n in ("hash join", "merge join", "nested loop") for n in nodes)),
                float(sum("sort" in n for n in nodes)),
                float(sum("aggregate" in n for n in nodes)), float(len(nodes))]
    else:
        plan = [0.0] * len(PLAN_FEATURES)
    table = [_lg(t.tables_bytes), _lg(t.tables_rows), _lg(t.write_rate)]
    return tuple(hist + plan + table)


_NO_TEMPLATE = (0.0,) * (len(HISTORY_FEATURES) + len(PLAN_FEATURES) + len(TABLE_FEATURES))

TIME_OF_DAY_FEATURES = ("tod_hour_sin", "tod_hour_cos", "tod_weekend")

# A template's expected time for one statement, from what the statement itself returned and was given:
# ln(1 + duration us) ~ w . basis, fit per template by the learner (learning.logdata.fit_expected_times) and
# shipped in TemplateStats as time_fit (basis with the parameters) and time_fit_rows (without them), each
# [coefficients..., lowest fitted value, highest fitted value, MAD of the residuals]. With parameters a hot
# customer's slow history is expected of it; without them the result's size still explains much.
_FIT_PARAMS = ("par_v0", "par_v1", "par_v2", "par_v3", "par_d01", "par_d12", "par_d23")
_FIT_PAR_INDEX = tuple(PARAM_FEATURES.index(n) for n in _FIT_PARAMS)
FIT_BASIS_ROWS = 3      # 1, ln(1 + rows), ln(1 + bytes)
FIT_BASIS_PARAMS = FIT_BASIS_ROWS + len(_FIT_PARAMS)


def fit_basis(rows, nbytes, pf: tuple | None) -> list[float]:
    """The regressors of the expected-time fit: with pf (param_features of the statement) the parameter ones too."""
    b = [1.0, _lg(rows), _lg(nbytes)]
    if pf is not None:
        b += [pf[j] for j in _FIT_PAR_INDEX]
    return b


def parameter_key(pf: tuple) -> str:
    """A short name for a statement's parameter values, from the values the expected-time fit sees (numbers,
    dates, string lengths): the key of TemplateStats.key_times."""
    values = [pf[j] for j in _FIT_PAR_INDEX]
    return hashlib.blake2b(struct.pack(f"<{len(values)}d", *values), digest_size=8).hexdigest()


def expected_time(t: "TemplateStats", rows, nbytes, pf: tuple | None) -> tuple[float, float] | None:
    """(expected ln(1 + duration us), MAD of the fit) for one statement of a template, None without a fit.

    Parameter values that the log shows often enough and far from the fit (a customer with a long history,
    when the time is not log-linear in the values) are expected to take their own typical time
    (TemplateStats.key_times, kept by the learner)."""
    fit = t.time_fit if pf is not None and t.time_fit else t.time_fit_rows
    if not fit:
        return None
    k = len(fit) - 3
    if pf is not None and t.key_times:
        own = t.key_times.get(parameter_key(pf))
        if own is not None:
            return own, fit[k + 2]
    b = fit_basis(rows, nbytes, pf if k > FIT_BASIS_ROWS else None)
    v = sum(c * x for c, x in zip(fit[:k], b))
    return min(max(v, fit[k]), fit[k + 1]), fit[k + 2]

_NO_FIT = np.zeros(FIT_BASIS_PARAMS + 3)
_NO_PF = (0.0,) * len(PARAM_FEATURES)


def _fit_rows(t: "TemplateStats") -> tuple:
    """(time_fit, time_fit_rows) as arrays [coefficients padded to FIT_BASIS_PARAMS, lo, hi, mad] (cached)."""
    if t._fits is None:
        def padded(fit):
            if not fit:
                return None
            k = len(fit) - 3
            a = np.zeros(FIT_BASIS_PARAMS + 3)
            a[:k] = fit[:k]
            a[FIT_BASIS_PARAMS:] = fit[k:]
            return a
        t._fits = (padded(t.time_fit), padded(t.time_fit_rows))
    return t._fits


def expectation_columns(templates: list, dur, rows, nbytes, pfs: list, sqlstates: list) -> np.ndarray:
    """The event features from ev_expected_log to ev_error_probe of a batch, as event_vector computes them one
    by one. templates: established TemplateStats or None per statement; pfs: its param_features or None."""
    n = len(templates)
    out = np.zeros((n, 5))
    if not n:
        return out
    fits, use_params = [], []
    for t, pf in zip(templates, pfs):
        f = None
        with_params = False
        if t is not None and t.calls:
            by_params, by_rows = _fit_rows(t)
            if pf is not None and by_params is not None:
                f, with_params = by_params, True
            else:
                f = by_rows
        fits.append(_NO_FIT if f is None else f)
        use_params.append(with_params)
    F = np.stack(fits)
    has = F[:, FIT_BASIS_PARAMS + 1] != 0.0   # hi: a fitted ln time is never 0 for a template with a fit
    B = np.zeros((n, FIT_BASIS_PARAMS))
    B[:, 0] = 1.0
    B[:, 1] = np.log1p(np.maximum(np.asarray(rows, dtype=np.float64), 0.0))
    B[:, 2] = np.log1p(np.maximum(np.asarray(nbytes, dtype=np.float64), 0.0))
    if any(use_params):
        P = np.array([pf if u else _NO_PF for pf, u in zip(pfs, use_params)], dtype=np.float64)
        B[:, FIT_BASIS_ROWS:] = P[:, _FIT_PAR_INDEX]
    dur = np.asarray(dur, dtype=np.float64)
    lo, hi, mad = F[:, FIT_BASIS_PARAMS], F[:, FIT_BASIS_PARAMS + 1], F[:, FIT_BASIS_PARAMS + 2]
    e_log = np.clip((B * F[:, :FIT_BASIS_PARAMS]).sum(axis=1), lo, hi)
    for i, (t, pf) in enumerate(zip(templates, pfs)):
        if pf is not None and t is not None and t.key_times:
            own = t.key_times.get(parameter_key(pf))
            if own is not None:
                e_log[i] = own
    z = (np.log1p(np.maximum(dur, 0.0)) - e_log) / (1.4826 * np.maximum(mad, _MAD_FLOOR))
    out[:, 0] = np.where(has, e_log, 0.0)
    out[:, 1] = np.where(has, mad, 0.0)
    out[:, 2] = np.where(has, np.clip(z, -_Z_CLIP, _Z_CLIP), 0.0)
    out[:, 3] = np.where(has, (dur - np.expm1(e_log)) / 1000.0, 0.0)
    out[:, 4] = [is_probe_error(code) for code in sqlstates]
    return out


# SQLSTATE classes of operational failures: connection, transaction state, serialization and deadlock,
# resources, lock not available, cancel and timeout, system errors. They say how the server is doing, not what
# the client tried; any other failure (undefined object, syntax, permission, bad input, constraint...) may be a
# probe.
OPERATIONAL_SQLSTATE_CLASSES = frozenset({"08", "25", "40", "53", "55", "57", "58"})


def is_probe_error(sqlstate) -> bool:
    """A failure whose SQLSTATE is not an operational one (a code-less failure counts)."""
    return bool(sqlstate) and sqlstate[:2] not in OPERATIONAL_SQLSTATE_CLASSES

EVENT_FEATURES = (
    "ev_duration_log", "ev_rows_log", "ev_bytes_log", "ev_error", "ev_z_duration", "ev_z_rows", "ev_z_bytes",
    "ev_new_template", "ev_app_known", "ev_client_known", "ev_app_template_share", "ev_client_recent_errors",
    "ev_over_p95_log10", "ev_excess_ms", "ev_expected_log", "ev_expected_mad_log", "ev_z_expected",
    "ev_excess_expected_ms", "ev_error_probe",
)
# Robust z-scores divide by at least this many log units: a template that always takes the same time is not
# "infinitely anomalous" when it takes 30% longer.
_MAD_FLOOR = 0.25
_Z_CLIP = 50.0


def _robust_z(value, p50, mad_log) -> float:
    if value is None or p50 is None:
        return 0.0
    scale = 1.4826 * max(float(mad_log or 0.0), _MAD_FLOOR)
    z = (math.log1p(max(0.0, float(value))) - math.log1p(max(0.0, float(p50)))) / scale
    return max(-_Z_CLIP, min(_Z_CLIP, z))


ALL_FEATURES = (STATEMENT_FEATURES + PARAM_FEATURES + HISTORY_FEATURES + PLAN_FEATURES + TABLE_FEATURES
                + TIME_OF_DAY_FEATURES + EVENT_FEATURES)
_INDEX = {name: i for i, name in enumerate(ALL_FEATURES)}

_SHAPE = tuple(n for n in STATEMENT_FEATURES if n.startswith("stmt_"))
_INJECTION = tuple(n for n in STATEMENT_FEATURES if n.startswith("inj_"))

FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    # execution time, predicted before the statement runs
    "time": STATEMENT_FEATURES + PARAM_FEATURES + HISTORY_FEATURES + PLAN_FEATURES + TABLE_FEATURES
    + TIME_OF_DAY_FEATURES,
    # whether caching a template's results pays (template level: no parameters, no clock)
    "cache": _SHAPE + HISTORY_FEATURES + PLAN_FEATURES + TABLE_FEATURES,
    # how unusual a finished statement was
    "anomaly": EVENT_FEATURES + _INJECTION + ("stmt_is_select", "stmt_is_ddl", "stmt_is_other", "stmt_tables",
                                              "stmt_or_terms", "stmt_constants")
    + tuple(n for n in PARAM_FEATURES if n in ("par_present", "par_max_len_log", "par_quotes", "par_sql_meta",
                                               "par_keywords", "par_tautology"))
    + ("hist_known", "hist_calls_log", "hist_p50_log_us", "hist_p95_log_us", "hist_mad_log_us", "hist_rows_p50_log",
       "hist_rows_mad_log", "hist_bytes_p50_log", "hist_bytes_mad_log", "hist_error_rate", "hist_apps"),
    # which workload class a template belongs to
    "cluster": ("stmt_is_select", "stmt_is_insert", "stmt_is_update", "stmt_is_delete", "stmt_is_ddl", "stmt_joins",
                "stmt_aggregates", "stmt_group_by", "stmt_limit", "hist_rate_log", "hist_mean_log_us",
                "hist_p95_log_us", "hist_rows_p50_log", "hist_bytes_p50_log", "hist_error_rate",
                "tbl_write_rate_log"),
}
_SELECT = {kind: np.array([_INDEX[n] for n in names], dtype=np.intp) for kind, names in FEATURE_NAMES.items()}


def event_vector(x: dict, t: TemplateStats | None, pf: tuple | None = None) -> list[float]:
    """The EVENT_FEATURES of one event dict, in order (t: its established template or None, pf: its
    param_features when the learner saw its values)."""
    dur, rows, nbytes = x.get("duration_us"), x.get("rows"), x.get("bytes_out")
    known = t is not None and bool(t.calls)
    expected = expected_time(t, rows, nbytes, pf) if known else None
    if expected is not None and dur is not None:
        e_log, e_mad = expected
        d_log = _lg(dur)
        fit = [e_log, e_mad, max(-_Z_CLIP, min(_Z_CLIP, (d_log - e_log) / (1.4826 * max(e_mad, _MAD_FLOOR)))),
               (float(dur) - math.expm1(e_log)) / 1000.0]
    else:
        fit = [0.0, 0.0, 0.0, 0.0]
    app = x.get("application_name")
    share = float(t.app_share.get(app or "", 0.0)) if known else 0.0
    return [
        _lg(dur), _lg(rows), _lg(nbytes), float(bool(x.get("sqlstate"))),
        _robust_z(dur, t.p50_us, t.mad_log_us) if known else 0.0,
        _robust_z(rows, t.rows_p50, t.rows_mad_log) if known else 0.0,
        _robust_z(nbytes, t.bytes_p50, t.bytes_mad_log) if known else 0.0,
        0.0 if known else 1.0, float(bool(x.get("app_known"))), float(bool(x.get("client_known"))), share,
        float(x.get("client_recent_errors") or 0),
        math.log10(max(float(dur or 0.0), 1e-3) / max(float(t.p95_us or 0.0), 1.0)) if known and dur else 0.0,
        (float(dur) - float(t.p50_us or 0.0)) / 1000.0 if known and dur else 0.0,
        *fit, float(is_probe_error(x.get("sqlstate"))),
    ]


def _time_of_day(ts) -> list[float]:
    if ts is None:
        return [0.0, 0.0, 0.0]
    seconds = float(ts) % 86400.0
    angle = 2.0 * math.pi * seconds / 86400.0
    weekday = (int(float(ts) // 86400.0) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return [math.sin(angle), math.cos(angle), float(weekday >= 5)]


def full_row(x: dict) -> list[float]:
    """Every feature in ALL_FEATURES order (transform_one selects a model kind's subset)."""
    sql = x.get("sql") or ""
    params = x.get("parameters")
    t = x.get("template")
    row = list(statement_features(sql))
    pf = param_features(tuple(params) if params is not None else None)
    row += pf
    row += t.vector() if t is not None else _NO_TEMPLATE
    row += _time_of_day(x.get("ts"))
    row += event_vector(x, t, pf if params is not None else None)
    return row


def transform_one(x: dict, kind: str) -> np.ndarray:
    """The feature row (float32, FEATURE_NAMES[kind] order) of one event dict."""
    return np.asarray(full_row(x), dtype=np.float32)[_SELECT[kind]]


def transform_many(xs, kind: str) -> np.ndarray:
    """transform_one over many dicts, stacked (n, len(FEATURE_NAMES[kind]))."""
    rows = [full_row(x) for x in xs]
    if not rows:
        return np.zeros((0, len(FEATURE_NAMES[kind])), dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)[:, _SELECT[kind]]


# ---------------------------------------------------------------------------------------------
# Serving context: what the learner exports beside its models so the proxy can build the same dicts.

class RecentErrors:
    """Errors per client over a sliding window, counted the same way while training and serving."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._times: dict[str, deque] = {}

    def __bool__(self) -> bool:
        """Whether some client has errors in its window (if none, a statement that did not fail counts 0)."""
        return bool(self._times)

    def observe(self, client: str, ts: float, is_error: bool) -> int:
        """Record this statement's outcome; return the client's errors in the window ending now (this one included)."""
        q = self._times.get(client)
        if q is None:
            if not is_error:
                return 0
            q = self._times[client] = deque()
        horizon = ts - self.window_s
        while q and q[0] < horizon:
            q.popleft()
        if is_error:
            q.append(ts)
        n = len(q)
        if not q:
            del self._times[client]
        return n


class ServingContext:
    """Template statistics and known applications/clients, exported by the learner as JSON.

    A template counts as known only when it is established: at least min_template_calls calls, at least
    min_known_share of them from known applications. A statement sent a few times by an unknown tool is
    history of an anomaly, not of the workload.
    """

    def __init__(self, templates: dict[str, TemplateStats] | None = None, apps=(), clients=(),
                 error_window_s: float = 10.0, feature_version: int = FEATURE_VERSION,
                 min_template_calls: int = 20, min_known_share: float = 0.5):
        self.templates = templates or {}
        self.apps = set(apps)
        self.clients = set(clients)
        self.feature_version = feature_version
        self.min_template_calls = min_template_calls
        self.min_known_share = min_known_share
        self.recent_errors = RecentErrors(error_window_s)
        self._established: dict[str, TemplateStats | None] = {}

    def established(self, fingerprint: str) -> TemplateStats | None:
        """The template's statistics if it is established, else None (cached)."""
        try:
            return self._established[fingerprint]
        except KeyError:
            pass
        t = self.templates.get(fingerprint)
        if t is not None and ((t.calls or 0) < self.min_template_calls or sum(
                share for app, share in t.app_share.items() if app in self.apps) < self.min_known_share):
            t = None
        self._established[fingerprint] = t
        return t

    def prepare(self, event: dict, fingerprint: str | None = None) -> dict:
        """The event dict completed with its template's statistics and its sender's familiarity (stateful)."""
        x = dict(event)
        x["template"] = self.established(fingerprint or event.get("fingerprint") or "")
        app = event.get("application_name") or ""
        client = event.get("client_addr") or ""
        x["app_known"] = app in self.apps
        x["client_known"] = client in self.clients
        x["client_recent_errors"] = self.observe(event)
        return x

    def reset_window(self) -> None:
        """Forget the sliding error window (before replaying another stretch of the log)."""
        self.recent_errors = RecentErrors(self.recent_errors.window_s)

    def observe(self, event: dict) -> int:
        """Count the event in its sender's error window; returns the sender's recent errors (prepare calls it)."""
        sender = f"{event.get('client_addr') or ''}|{event.get('application_name') or ''}"
        return self.recent_errors.observe(sender, float(event.get("ts") or 0.0), bool(event.get("sqlstate")))

    def to_json(self) -> str:
        return json.dumps({
            "feature_version": self.feature_version,
            "error_window_s": self.recent_errors.window_s, "min_template_calls": self.min_template_calls,
            "min_known_share": self.min_known_share, "apps": sorted(self.apps), "clients": sorted(self.clients),
            "templates": {fp: t.to_dict() for fp, t in self.templates.items()},
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ServingContext":
        d = json.loads(text)
        return cls({fp: TemplateStats.from_dict(v) for fp, v in d.get("templates", {}).items()},
                   d.get("apps", ()), d.get("clients", ()), d.get("error_window_s", 10.0),
                   d.get("feature_version", -1), d.get("min_template_calls", 20), d.get("min_known_share", 0.5))


# ---------------------------------------------------------------------------------------------
# Anomaly rules on an anomaly feature row: the interpretable signals the served model is distilled from,
# also usable by the proxy to say why a statement was flagged.

ANOMALY_CLASSES = ("slow_outlier", "unusual_rows", "new_template", "error_burst", "injection")
_A = {name: i for i, name in enumerate(FEATURE_NAMES["anomaly"])}
SLOW_MIN_EXCESS_MS = 2.0        # a slow outlier takes at least this much longer than expected of it,
SLOW_OVER_EXPECTED_LOG10 = 1.0  # ... at least 10x that (the learner raises this on a noisy server),
SLOW_MIN_Z = 4.0                # ... and is this far beyond its template's fit (robust z of the residual)
VOLUME_MIN_ROWS = 1000.0        # an unusual result has at least this many rows or bytes
VOLUME_MIN_BYTES = 100_000.0


def anomaly_signals(X: np.ndarray, slow_over_expected_log10: float = SLOW_OVER_EXPECTED_LOG10) -> np.ndarray:
    """Per row, one score per ANOMALY_CLASSES entry (0: nothing odd, >= 1: clearly that anomaly).

    slow_over_expected_log10: log10 of how many times the time its template's fit expects of it a statement
    must take to be a slow outlier (score 0.6 there, 1.3 at 5x more); the anomaly model's metadata carries the
    value it was trained with.
    """
    X = np.asarray(X, dtype=np.float64)

    def col(name: str) -> np.ndarray:
        return X[:, _A[name]]

    known = col("hist_known") > 0
    unusual_client = (col("ev_app_known") == 0) | (col("ev_client_known") == 0) | (
        known & (col("ev_app_template_share") < 0.01))
    big = (np.expm1(col("ev_rows_log")) >= VOLUME_MIN_ROWS) | (np.expm1(col("ev_bytes_log")) >= VOLUME_MIN_BYTES)
    volume_z = np.maximum(col("ev_z_rows"), col("ev_z_bytes"))
    # slow: far beyond what its template takes for a statement of this size with these parameters (robust z
    # against the template's fit) and by enough to matter; a statement slow because it returned far more than
    # usual is a volume anomaly, not a slow one
    over = (col("ev_duration_log") - col("ev_expected_log")) / np.log(10.0) - slow_over_expected_log10
    slow = np.where(known & (col("ev_z_expected") >= SLOW_MIN_Z) & (volume_z < 3.0) & (over >= 0.0)
                    & (col("ev_excess_expected_ms") >= SLOW_MIN_EXCESS_MS), np.clip(0.6 + over, 0, 2), 0.0)
    volume = np.where(known & big, np.clip(volume_z / np.where(unusual_client, 4.0, 8.0), 0, 2), 0.0)
    novelty = np.where(known, 0.0, np.where(unusual_client, 1.0, 0.3))
    error = col("ev_error") > 0
    burst = np.where(error, np.clip(col("ev_client_recent_errors") - 1.0, 0, 2), 0.0)
    # a non-operational failure (undefined object, syntax, permission, bad input, constraint) of a statement
    # never seen before or of one that always fails: a probe more often than a bug (a timeout, a deadlock or a
    # lack of resources says how the server is doing: an analytical query that always times out is no probe)
    burst = np.maximum(burst, np.where(error & (col("ev_error_probe") > 0) & (~known | (col("hist_error_rate") >= 0.9)),
                                       0.6, 0.0))
    strong = ((col("inj_const_comparisons") > 0) | (col("inj_statements") > 1) | (col("inj_union_nulls") > 0)
              | (col("inj_suspicious_funcs") > 0) | (col("par_tautology") > 0))
    # weak signs: any two of them, or one on a template without history, make a flag (score 0.6)
    weak = (0.3 * (col("inj_catalog") > 0) + 0.3 * (col("inj_comments") > 0) + 0.3 * (col("par_quotes") > 0)
            + 0.3 * (col("par_sql_meta") > 0) + 0.4 * ((col("stmt_is_ddl") > 0) & ~known)
            + 0.3 * (col("inj_union") > 0))
    weak = weak + 0.3 * ((weak > 0) & ~known)
    injection = np.clip(strong * 1.0 + weak, 0, 2)
    return np.stack([slow, volume, novelty, burst, injection], axis=1)


def anomaly_reasons(X: np.ndarray, slow_over_expected_log10: float = SLOW_OVER_EXPECTED_LOG10
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(rule score, index into ANOMALY_CLASSES of the strongest signal) per anomaly feature row."""
    signals = anomaly_signals(X, slow_over_expected_log10)
    return signals.max(axis=1), signals.argmax(axis=1)
