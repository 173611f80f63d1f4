"""Whether a statement text may be answered from the cache: the syntactic half of the safety analysis.

Three things live here, all without a database:
- `shape_of(sql)`: the text with each literal replaced by a marker of its type class (string, int4, int8,
  numeric), so texts that differ only in constants share one verdict; literal values matter to a verdict only
  through their type (overload resolution) or when they are special date/time inputs ('now', 'today'...),
  which make the text uncacheable and are never shared.
- `syntax_facts(sql)`: what the parse tree says (one SELECT? locking clause? data-modifying CTE? SQL value
  functions such as current_user? function names called, parameters and their byte offsets).
- `scan_node_tree(text)`: what Postgres' own analysed query tree (a view's pg_rewrite.ev_action) references:
  function, operator and relation OIDs and the node kinds the cache refuses; used by the catalog probe.
Reason codes for uncacheable statements are the REASON_* constants.
"""
from __future__ import annotations

import json
import re

from pglast import parser as pg_parser

from proxy.analysis import _KEY_LEXER  # the literal/comment/identifier lexer of the statement analysis

# Reason codes: why a statement is not answered from the cache (counted in stats()).
PENDING = "pending"                # not analysed yet (analysis scheduled)
NOT_SELECT = "not_select"          # not a single plain SELECT (writes, DDL, utility, SELECT INTO...)
MULTI_STATEMENT = "multi_statement"
LOCKING = "locking"                # FOR UPDATE / FOR SHARE
WRITES = "writes"                  # a data-modifying CTE
VOLATILE = "volatile"              # a function that is not IMMUTABLE, a SQL value function, 'now'-like input
SECURITY_DEFINER = "security_definer"
SYSTEM_CATALOG = "system_catalog"
TEMP_TABLE = "temp_table"
UNLOGGED = "unlogged"              # not seen by logical decoding
FOREIGN_TABLE = "foreign_table"
SEQUENCE = "sequence"
RLS = "rls"                        # row-level security on a table read
VIEW_PRIVILEGE = "view_privilege"  # a view reads something the role could not read directly
CATALOG_TYPE = "catalog_type"      # reg* types (their text depends on the catalog)
TABLESAMPLE = "tablesample"
UNPARSEABLE = "unparseable"
ANALYSIS_ERROR = "analysis_error"  # Postgres refused to analyse the text (unknown table, syntax...)
DISABLED = "disabled"              # the cache is not running

STRING, INT4, INT8, NUMERIC = "\x01", "\x02", "\x03", "\x04"
_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1
# Date/time input strings evaluated when the statement is parsed: the same text means another value later.
_MOVING_INPUT = re.compile(r"(?<![a-z])(?:now|today|tomorrow|yesterday)(?![a-z])", re.IGNORECASE)
_MOVING_INPUT_BYTES = re.compile(rb"(?<![a-zA-Z])(?:[nN][oO][wW]|[tT][oO][dD][aA][yY]|[tT][oO][mM][oO][rR][rR][oO][wW]"
                                 rb"|[yY][eE][sS][tT][eE][rR][dD][aA][yY])(?![a-zA-Z])")


class _Moving(Exception):
    pass


class _Bad(Exception):
    pass


def _shape_repl(m: re.Match) -> str:
    g = m.lastgroup
    if g == "ident" or g == "param":
        return m.group()
    if g == "comment":
        return " "
    if g == "num":
        t = m.group()
        if t.isdigit():
            v = int(t)
            return INT4 if v <= _INT4_MAX else INT8 if v <= _INT8_MAX else NUMERIC
        return NUMERIC
    if g == "bad":
        raise _Bad
    # str, estr, dollar: an unknown-typed string literal
    if _MOVING_INPUT.search(m.group()) is not None:
        raise _Moving
    return STRING


def shape_of(sql: str) -> tuple[str | None, bool]:
    """(shape shared by texts differing only in constants, or None; whether a literal is a moving date/time input)."""
    try:
        return _KEY_LEXER.sub(_shape_repl, sql), False
    except _Moving:
        return None, True
    except _Bad:
        return None, False


def params_have_moving_input(params: bytes) -> bool:
    """Bound parameter bytes that could be 'now'/'today'/... for a date/time parameter."""
    return _MOVING_INPUT_BYTES.search(params) is not None


# Volatile built-ins denied on sight, before any catalog lookup (the probe would deny them too).
_VOLATILE_NAMES = frozenset({
    "now", "random", "setseed", "nextval", "currval", "lastval", "setval", "clock_timestamp",
    "statement_timestamp", "transaction_timestamp", "timeofday", "pg_sleep", "gen_random_uuid",
    "uuid_generate_v4", "txid_current", "pg_current_xact_id", "current_setting", "set_config",
    "pg_backend_pid", "inet_client_addr", "pg_advisory_lock", "pg_try_advisory_lock", "pg_notify",
})
# Built-ins that run SQL given as text, which may write.
BUILTIN_WRITERS = frozenset({"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
                             "cursor_to_xml", "cursor_to_xmlschema", "dblink_exec", "dblink"})
_WRITE_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# Statements whose writes cannot be known from their text; ALTER SYSTEM may change settings' server defaults.
_FLUSH_UTILITIES = frozenset({"CallStmt", "DoStmt", "ExecuteStmt", "AlterSystemStmt"})


class SyntaxFacts:
    """What one statement text's parse tree says, for classify() and writes()."""

    __slots__ = ("reason", "node", "functions", "params", "stmt_start", "stmt_end", "truncate_cascade",
                 "statements")

    def __init__(self):
        self.reason: str | None = None          # why not cacheable (None: worth a catalog probe)
        self.node = ""                          # top node type of the (first) statement
        self.functions: frozenset[str] = frozenset()  # lower-case names of functions called
        self.params: tuple[tuple[int, int], ...] = ()  # ($n number, byte offset) of parameter references
        self.stmt_start = 0                     # byte span of the statement (without a trailing semicolon)
        self.stmt_end: int | None = None
        self.truncate_cascade = False
        self.statements: tuple[str, ...] = ()   # top node type of each statement


def syntax_facts(sql: str) -> SyntaxFacts:
    f = SyntaxFacts()
    try:
        tree = json.loads(pg_parser.parse_sql_json(sql))
    except Exception:  # pglast.parser.ParseError: Postgres will say so itself
        f.reason = UNPARSEABLE
        return f
    stmts = tree.get("stmts") or []
    f.statements = tuple(next(iter(s.get("stmt", {"": None}))) for s in stmts)
    if not stmts:
        f.reason = NOT_SELECT
        return f
    functions: set[str] = set()
    params: list[tuple[int, int]] = []
    reason = None
    for raw in stmts:
        (node, body), = raw["stmt"].items()
        r = _walk(node, body, functions, params)
        reason = reason or r
        if node == "TruncateStmt" and body.get("behavior") == "DROP_CASCADE":
            f.truncate_cascade = True
    f.node = f.statements[0]
    f.functions = frozenset(functions)
    f.params = tuple(params)
    if len(stmts) > 1:
        f.reason = MULTI_STATEMENT
    elif f.node != "SelectStmt" or "intoClause" in stmts[0]["stmt"]["SelectStmt"]:
        f.reason = NOT_SELECT
    else:
        f.reason = reason
        f.stmt_start = stmts[0].get("stmt_location", 0)
        n = stmts[0].get("stmt_len", 0)
        f.stmt_end = f.stmt_start + n if n else None
    return f


def _walk(node: str, body: dict, functions: set[str], params: list[tuple[int, int]]) -> str | None:
    """Collect function names and parameters of one statement; the first refusal reason found, if any."""
    reason = None
    stack: list[tuple[str, object]] = [(node, body)]
    while stack:
        name, value = stack.pop()
        if type(value) is list:
            stack.extend((name, v) for v in value)
            continue
        if type(value) is not dict:
            continue
        if name == "FuncCall":
            parts = [n["String"]["sval"] for n in value.get("funcname", ()) if "String" in n]
            if parts:
                fn = parts[-1].lower()
                functions.add(fn)
                if fn in _VOLATILE_NAMES:
                    reason = reason or VOLATILE
        elif name == "ParamRef":
            params.append((value.get("number", 0), value.get("location", -1)))
        elif name == "SQLValueFunction":
            reason = reason or VOLATILE
        elif name == "RangeTableSample":
            reason = reason or TABLESAMPLE
        elif name == "lockingClause":
            reason = reason or LOCKING
        elif name in _WRITE_NODES and name != node:
            reason = reason or WRITES
        for field, sub in value.items():
            if type(sub) is dict or type(sub) is list:
                stack.append((field, sub))
    return reason


def flushes_on_sight(facts: SyntaxFacts) -> bool:
    """CALL, DO, EXECUTE (writes unknown from the text) and ALTER SYSTEM."""
    return any(s in _FLUSH_UTILITIES for s in facts.statements)


# ---------------------------------------------------------------- Postgres' analysed query tree

_TOKEN = re.compile(r"[(){}]|(?:\\.|[^\s(){}\\])+")
_FUNC_FIELDS = {
    "FUNCEXPR": ("funcid",), "AGGREF": ("aggfnoid",), "WINDOWFUNC": ("winfnoid",),
    "OPEXPR": ("opfuncid",), "DISTINCTEXPR": ("opfuncid",), "NULLIFEXPR": ("opfuncid",),
    "SCALARARRAYOPEXPR": ("opfuncid", "hashfuncid", "negfuncid"),
}
_OP_FIELDS = {
    "OPEXPR": ("opno",), "DISTINCTEXPR": ("opno",), "NULLIFEXPR": ("opno",), "SCALARARRAYOPEXPR": ("opno",),
    "SORTGROUPCLAUSE": ("eqop", "sortop"),
}
_REFUSED_NODES = {"SQLVALUEFUNCTION": VOLATILE, "NEXTVALUEEXPR": VOLATILE, "TABLESAMPLECLAUSE": TABLESAMPLE,
                  "CURRENTOFEXPR": NOT_SELECT}


class NodeFacts:
    """OIDs and refusals found in one analysed query tree."""

    __slots__ = ("functions", "operators", "relations", "types", "reason")

    def __init__(self):
        self.functions: set[int] = set()
        self.operators: set[int] = set()
        self.relations: set[int] = set()     # RTE_RELATION relids
        self.types: set[int] = set()         # constant and I/O-coercion result types
        self.reason: str | None = None


def scan_node_tree(text: str) -> NodeFacts:
    """Walk a pg_node_tree text (outfuncs format) with a node-type stack; no full parse is needed."""
    facts = NodeFacts()
    tokens = _TOKEN.findall(text)
    stack: list[str] = []
    rtekind: list[str | None] = []
    n = len(tokens)
    i = 0
    while i < n:
        t = tokens[i]
        if t == "{":
            node = tokens[i + 1] if i + 1 < n else ""
            stack.append(node)
            rtekind.append(None)
            r = _REFUSED_NODES.get(node)
            if r is not None and facts.reason is None:
                facts.reason = r
            i += 2
            continue
        if t == "}":
            if stack:
                stack.pop()
                rtekind.pop()
            i += 1
            continue
        if t[0] != ":" or not stack or i + 1 >= n:
            i += 1
            continue
        field = t[1:]
        value = tokens[i + 1]
        node = stack[-1]
        if node in _FUNC_FIELDS and field in _FUNC_FIELDS[node]:
            if value.isdigit() and value != "0":
                facts.functions.add(int(value))
        elif node in _OP_FIELDS and field in _OP_FIELDS[node]:
            if value.isdigit() and value != "0":
                facts.operators.add(int(value))
        elif node == "ROWCOMPAREEXPR" and field == "opnos" and value == "(":
            j = i + 2
            while j < n and tokens[j] != ")":
                if tokens[j].isdigit():
                    facts.operators.add(int(tokens[j]))
                j += 1
        elif node == "RANGETBLENTRY":
            if field == "rtekind":
                rtekind[-1] = value
            elif field == "relid" and rtekind[-1] == "0" and value.isdigit() and value != "0":
                facts.relations.add(int(value))
            elif field == "tablesample" and value != "<>" and facts.reason is None:
                facts.reason = TABLESAMPLE
        elif node == "QUERY":
            if field == "hasModifyingCTE" and value == "true" and facts.reason is None:
                facts.reason = WRITES
            elif field in ("hasForUpdate", "hasRowSecurity") and value == "true" and facts.reason is None:
                facts.reason = LOCKING if field == "hasForUpdate" else RLS
            elif field == "rowMarks" and value != "<>" and facts.reason is None:
                facts.reason = LOCKING
        elif (node == "CONST" and field == "consttype") or (node == "COERCEVIAIO" and field == "resulttype"):
            if value.isdigit():
                facts.types.add(int(value))
        i += 1
    return facts
