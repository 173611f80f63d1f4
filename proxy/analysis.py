"""Per-statement analysis (fingerprint, normalized text, kind, tables read and written), cached per SQL text.

`Analyzer.analyze(sql)` answers from an LRU cache. The cache is looked up first by the exact text, then by a
literal-stripped key (numeric and quoted literals replaced by a NUL placeholder, comments dropped), so texts
that differ only in their constants, as simple-protocol clients send them (`... WHERE aid = 123`, `... = 456`),
share one analysis. A miss costs one `pglast.parser.parse_sql_json` plus one `fingerprint` per statement;
the Python AST (`pglast.parse_sql`) is never built.

Sharing an entry between texts is sound only where constants do not change the analysis: every literal of
the text must be a constant node (A_Const, which the fingerprint ignores; not current_timestamp(3)'s precision,
a COMMENT's text or a COPY file name), and the statement not of kind ddl, utility or copy. Other texts are
cached under their exact text only. Type modifiers (varchar(10)) are constants the fingerprint ignores but
normalization keeps, so the normalized text of a shared entry shows the first text's modifiers. Unparseable
texts are not shared either. What remains: a text that fails to parse only because of the type of one of its
literals (`interval 5 day` where `interval '5' day` parses) gets the analysis of a well-formed sibling
cached before it; the server refuses such a statement anyway.

Unparseable SQL never raises: it gets kind "other" and a sha1-based fingerprint of its literal-stripped text
(of the raw text when even the scanner cannot make sense of it, e.g. an unterminated quote).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict

from pglast import parser as pg_parser

KINDS = ("select", "insert", "update", "delete", "merge", "ddl", "utility", "copy", "transaction", "set", "other")

# Kinds whose analysis does not depend on literal values, so texts differing only in constants share one entry.
_SHAREABLE_KINDS = frozenset({"select", "insert", "update", "delete", "merge", "transaction", "set", "other"})

PLACEHOLDER = "\0"  # stands for a literal in cache keys; it cannot occur in a protocol query string

# Cache keys: a number is a digit run not glued to an identifier; anything unusual (hex, 1_000) stays verbatim,
# which only costs sharing. The first character of each alternative is a literal class, which keeps sre fast.
_KEY_NUM = (r"\d(?<![\w$.]\d)\d*(?:\.\d*)?(?:[eE][+-]?\d+)?(?![\w$])"
            r"|\.\d(?<![\w$.]\.\d)\d*(?:[eE][+-]?\d+)?(?![\w$])")
_FAST_KEY = re.compile(r"'(?:[^']|'')*'|" + _KEY_NUM)
_IDENT_NEEDS_LEXER = re.compile(r"[\d']")
_KEY_LEXER = re.compile(   # each alternative starts with a character, not a lookbehind, for speed
    r"""(?P<ident>"(?:[^"]|"")*")"""
    r"|(?P<comment>--[^\n]*|/\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/)"
    r"|(?P<estr>[eE](?<![\w$][eE])'(?:[^'\\]|\\[\s\S]|'')*')"
    r"|(?P<str>'(?:[^']|'')*')"
    r"|(?P<dollar>\$(?<![\w$]\$)(?P<tag>(?:[A-Za-z_\x80-\U0010ffff]\w*)?)\$[\s\S]*?\$(?P=tag)\$)"
    r"|(?P<param>\$(?<![\w$]\$)\d+)"
    r"|(?P<num>" + _KEY_NUM + r")"
    r"""|(?P<bad>['"]|/\*)"""
)

# Normalization and literal extraction: every literal the SQL scanner knows, prefixes (B'', X'', U&'') included.
_NUM = (r"(?<![\w$.])(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+"
        r"|(?:\d+(?:_\d+)*(?:\.(?:\d+(?:_\d+)*)?)?|\.\d+(?:_\d+)*)(?:[eE][+-]?\d+)?)(?![\w$])")
_PREFIX = r"(?:(?<![\w$])(?:[bBxXnN]|[uU]&))?"
# The first alternative that matches at a position wins, as in the SQL scanner.
_LEXER = re.compile(
    r"""(?P<ident>"(?:[^"]|"")*")"""
    r"|(?P<comment>--[^\n]*|/\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/)"
    r"|(?P<estr>(?<![\w$])[eE]'(?:[^'\\]|\\[\s\S]|'')*')"
    r"|(?P<str>" + _PREFIX + r"'(?:[^']|'')*')"
    r"|(?P<dollar>(?<![\w$])\$(?P<tag>(?:[A-Za-z_\x80-\U0010ffff]\w*)?)\$[\s\S]*?\$(?P=tag)\$)"
    r"|(?P<param>(?<![\w$])\$\d+)"
    r"|(?P<num>" + _NUM + r")"
    # An unterminated quote or a nested comment: everything after it is one opaque literal.
    r"""|(?P<bad>['"][\s\S]*|/\*[\s\S]*)"""
)
_LITERAL_GROUPS = frozenset({"estr", "str", "dollar", "num", "bad"})


class _Unsafe(Exception):
    pass


def _key_repl(m: re.Match) -> str:
    g = m.lastgroup
    if g == "ident" or g == "param":
        return m.group()
    if g == "comment":
        return " --" if m.group().startswith("--") else " "
    if g == "estr":
        return m.group()[0] + PLACEHOLDER  # the same key as the fast path gives E'' strings without backslashes
    if g == "bad":
        raise _Unsafe
    return PLACEHOLDER


def _plain_key(text: str) -> str | None:
    """The key of a text the single fast pattern lexes correctly, or None when it needs the full lexer."""
    if "$" in text or "\\" in text or "--" in text or "/*" in text:
        return None
    if '"' in text and _IDENT_NEEDS_LEXER.search("".join(text.split('"')[1::2])) is not None:
        return None
    return _FAST_KEY.sub(PLACEHOLDER, text)


def literal_key(sql: str) -> tuple[str, bool]:
    """The text with its literals replaced by PLACEHOLDER (comments dropped, a `--` kept), and whether it lexed
    cleanly.

    Two texts with the same key differ only in constants (and comments). When the text does not lex cleanly
    (an unterminated quote, a nested comment) it is returned itself, with False.
    """
    key = _plain_key(sql)
    if key is None:
        # A trailing comment (sqlcommenter, marginalia) on an otherwise plain text keeps the fast path;
        # the result is what the full lexer gives.
        body = sql.rstrip()
        start = body.rfind("/*")
        if body.endswith("*/") and start >= 0 and len(body) - start >= 4 and "*/" not in body[start + 2:-2]:
            head = _plain_key(sql[:start])
            if head is not None:
                key = head + " " + sql[len(body):]
    if key is not None:
        if "'" not in key:
            return key, True
        return sql, False  # an unterminated quote
    try:
        return _KEY_LEXER.sub(_key_repl, sql), True
    except _Unsafe:
        return sql, False


def _lex(sql: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]], bool]:
    """Literal spans, comment spans, parameter spans ($n), and whether the text lexed cleanly."""
    literals, comments, params = [], [], []
    clean = True
    for m in _LEXER.finditer(sql):
        g = m.lastgroup
        if g in _LITERAL_GROUPS:
            literals.append(m.span())
            if g == "bad":
                clean = False
        elif g == "comment":
            comments.append(m.span())
        elif g == "param":
            params.append(m.span())
    return literals, comments, params, clean


def _comment_marker(sql: str, start: int) -> str:
    """What a comment leaves in the normalized text: ` --` for a line comment, a space for a block comment."""
    return " --" if sql.startswith("--", start) else " "


def _unquote(token: str) -> str:
    if token.startswith("'") and token.endswith("'") and len(token) >= 2:
        return token[1:-1].replace("''", "'")
    return token


def extract_literals(sql: str) -> list[str]:
    """The literal values of a text in order (plain strings unquoted, anything else as written)."""
    return [_unquote(sql[s:e]) for s, e in _lex(sql)[0]]


class StatementInfo:
    """What the log and the cache need to know about one SQL text (one statement, or several in `statements`)."""

    __slots__ = ("fingerprint", "normalized", "kind", "tables_read", "tables_written", "statements",
                 "literal_count", "parsed", "shareable", "copy_fields", "single")

    def __init__(self, fingerprint: str, normalized: str, kind: str, tables_read: tuple[str, ...],
                 tables_written: tuple[str, ...], literal_count: int, parsed: bool,
                 statements: tuple["StatementInfo", ...] | None = None, shareable: bool = True):
        self.fingerprint = fingerprint          # 16 hex digits (pglast fingerprint, or sha1-based when unparseable)
        self.normalized = normalized            # constants replaced by $n, comments dropped (a `--` kept)
        self.kind = kind                        # one of KINDS
        self.tables_read = tables_read          # "schema.table" where the SQL qualifies it, else "table"
        self.tables_written = tables_written
        self.literal_count = literal_count      # literals in the text, to split extracted values per statement
        self.parsed = parsed
        self.statements = statements if statements is not None else (self,)
        # Whether texts differing from this one only in literals have the same analysis (see Analyzer).
        self.shareable = shareable and all(s.shareable for s in statements or ())
        self.copy_fields: bytes | None = None   # the query log's binary COPY fields of it, encoded on first use
        self.single = self.statements[0] if len(self.statements) == 1 else None   # its only statement, if one


    def __repr__(self) -> str:
        return (f"StatementInfo({self.fingerprint} {self.kind} read={list(self.tables_read)} "
                f"written={list(self.tables_written)} {self.normalized!r}"
                + (f" statements={len(self.statements)})" if len(self.statements) > 1 else ")"))


# --- statement kind and tables, from parse_sql_json's JSON ---

_SIMPLE_KINDS = {
    "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete", "MergeStmt": "merge",
    "CopyStmt": "copy", "TransactionStmt": "transaction", "VariableSetStmt": "set",
}
_DDL = frozenset({
    "RenameStmt", "CommentStmt", "GrantStmt", "GrantRoleStmt", "IndexStmt", "ViewStmt", "TruncateStmt",
    "DefineStmt", "CompositeTypeStmt", "RuleStmt", "SecLabelStmt", "RefreshMatViewStmt", "ReassignOwnedStmt",
    "ImportForeignSchemaStmt", "DropOwnedStmt",
})
_NOT_DDL = frozenset({"AlterSystemStmt"})


def statement_kind(node_type: str, body: dict) -> str:
    if node_type == "SelectStmt":
        return "ddl" if "intoClause" in body else "select"
    kind = _SIMPLE_KINDS.get(node_type)
    if kind is not None:
        return kind
    if node_type in _DDL or (node_type.startswith(("Create", "Alter", "Drop")) and node_type not in _NOT_DDL):
        return "ddl"
    return "utility"


# Fields of a node whose relations are written by the statement.
_WRITE_TARGETS = {
    "InsertStmt": ("relation",), "UpdateStmt": ("relation",), "DeleteStmt": ("relation",),
    "MergeStmt": ("relation",), "CreateStmt": ("relation",), "CreateTableAsStmt": ("into",),
    "SelectStmt": ("intoClause",), "AlterTableStmt": ("relation",), "RenameStmt": ("relation",),
    "TruncateStmt": ("relations",), "IndexStmt": ("relation",), "RefreshMatViewStmt": ("relation",),
    "ViewStmt": ("view",), "CreateTrigStmt": ("relation",), "RuleStmt": ("relation",),
    "CreatePolicyStmt": ("table",), "AlterPolicyStmt": ("table",), "CreateForeignTableStmt": ("base",),
}
# Statements that only describe a query: whatever it would write is reported as read.
_DESCRIBE_ONLY = frozenset({"PrepareStmt", "DeclareCursorStmt", "CreateFunctionStmt"})
_DROPPED_RELATIONS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX",
                                "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE"})


def _relname(rv: dict) -> str:
    schema = rv.get("schemaname")
    return f"{schema}.{rv['relname']}" if schema else rv["relname"]


class _TreeFacts:
    __slots__ = ("read", "written", "ctes", "typmod_locs", "const_locs")

    def __init__(self):
        self.read: list[tuple[int, str]] = []      # (location, name): sorted into text order at the end
        self.written: list[tuple[int, str]] = []
        self.ctes: set[str] = set()
        self.typmod_locs: set[int] = set()   # byte offsets of constants inside type modifiers (varchar(10))
        self.const_locs: set[int] = set()    # byte offsets of all A_Const nodes (a '-' there is part of it)


def _collect(stmt: dict) -> _TreeFacts:
    """Walk one statement's JSON tree (iteratively: expressions can nest deeply).

    Nodes appear either wrapped ({"RangeVar": {...}} in lists of nodes) or inline under a field name
    ("relation": {...}); each stack entry carries the name it appears under, so both read the same.
    """
    facts = _TreeFacts()
    # (name it appears under, value, relations here are written, inside a type name, describe-only context)
    stack: list[tuple[str | None, object, bool, bool, bool]] = [(None, stmt, False, False, False)]
    while stack:
        name, value, writes, in_type, describe = stack.pop()
        if type(value) is list:
            stack.extend((name, v, writes, in_type, describe) for v in value)
            continue
        if type(value) is not dict:
            if name == "ctename":
                facts.ctes.add(value)
            continue
        if "relname" in value:
            (facts.written if writes and not describe else facts.read).append(
                (value.get("location", -1), _relname(value)))
            continue
        if name == "A_Const":
            loc = value.get("location")
            if loc is not None:
                facts.const_locs.add(loc)
                if in_type:
                    facts.typmod_locs.add(loc)
            continue
        targets: tuple[str, ...] = ()
        if name is not None and name[:1].isupper():
            if name == "TypeName":
                in_type = True
            elif name == "ExplainStmt":
                describe = describe or not any(
                    o.get("DefElem", {}).get("defname") == "analyze" for o in value.get("options", ()))
            elif name in _DESCRIBE_ONLY:
                describe = True
            elif name == "DropStmt":
                if value.get("removeType") in _DROPPED_RELATIONS:
                    for obj in value.get("objects", ()):
                        names = [i["String"]["sval"] for i in obj.get("List", {}).get("items", ()) if "String" in i]
                        if names:
                            (facts.read if describe else facts.written).append((-1, ".".join(names[-2:])))
                continue
            elif name == "CopyStmt" and value.get("is_from"):
                targets = ("relation",)
            targets = targets or _WRITE_TARGETS.get(name, ())
        elif name == "typeName":
            in_type = True
        for field, sub in value.items():
            if type(sub) is dict or type(sub) is list or field == "ctename":
                stack.append((field, sub, writes or field in targets, in_type, describe))
    return facts


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _sha1_fingerprint(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Analyzer:
    """An LRU cache of StatementInfo by SQL text (and by literal-stripped text where that is sound).

    Bounded both in entries and in characters of cached text, since a bulk INSERT can be megabytes long.
    """

    def __init__(self, max_entries: int = 10_000, max_chars: int = 32 * 1024 * 1024):
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._cache: OrderedDict[str, StatementInfo] = OrderedDict()
        self.cached_chars = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def analyze(self, sql: str) -> StatementInfo:
        cache = self._cache
        info = cache.get(sql)
        if info is not None:
            cache.move_to_end(sql)
            self.hits += 1
            return info
        key, clean = literal_key(sql)
        if key != sql:
            info = cache.get(key)
            if info is not None:
                cache.move_to_end(key)
                self.hits += 1
                return info
        self.misses += 1
        info = analyze_uncached(sql, key if clean else None)
        entry = key if clean and info.shareable else sql
        size = len(entry) + len(info.normalized)
        if size <= self.max_chars // 16:
            cache[entry] = info
            self.cached_chars += size
            while len(cache) > self.max_entries or self.cached_chars > self.max_chars:
                old_key, old = cache.popitem(last=False)
                self.cached_chars -= len(old_key) + len(old.normalized)
        return info


def analyze_uncached(sql: str, key: str | None = None) -> StatementInfo:
    """Analyse one text without any cache; never raises. `key` is its literal_key() when that lexed cleanly."""
    try:
        return _analyze(sql)
    except Exception:  # pglast.parser.ParseError, and anything odd in a tree we did not foresee
        if key is None:
            key, clean = literal_key(sql)
            if not clean:
                key = None
        literals, comments, _, _ = _lex(sql)
        # Not shared: a sibling text may parse (current_timestamp(0) vs current_timestamp('x')).
        if key is not None:
            return StatementInfo(_sha1_fingerprint(key), key.replace(PLACEHOLDER, "?").strip(), "other",
                                 (), (), len(literals), False, shareable=False)
        # Literals become "?" and comments go (a line comment leaves its marker), as in the key; the fingerprint
        # is of the raw text.
        edits = sorted([(s, e, "?") for s, e in literals]
                       + [(s, e, _comment_marker(sql, s)) for s, e in comments])
        out, pos = [], 0
        for s, e, replacement in edits:
            if s >= pos:
                out.append(sql[pos:s])
                out.append(replacement)
                pos = e
        out.append(sql[pos:])
        return StatementInfo(_sha1_fingerprint(sql), "".join(out).strip(), "other", (), (), len(literals), False,
                             shareable=False)


def _analyze(sql: str) -> StatementInfo:
    tree = json.loads(pg_parser.parse_sql_json(sql))
    stmts = tree.get("stmts", [])
    literals, comments, params, _ = _lex(sql)
    if sql.isascii():
        to_char = None
    else:
        encoded = sql.encode("utf-8")
        def to_char(offset: int) -> int:  # noqa: E306 - parser locations are byte offsets
            return len(encoded[:offset].decode("utf-8", "ignore"))
    if not stmts:
        key = literal_key(sql)[0]
        return StatementInfo(_sha1_fingerprint(key), "", "other", (), (), len(literals), True)
    infos = []
    for raw in stmts:
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        end = start + length if length else None
        if to_char is None:
            cs, ce = start, (len(sql) if end is None else end)
        else:
            cs, ce = to_char(start), (len(sql) if end is None else to_char(end))
        infos.append(_statement_info(sql, cs, ce, raw["stmt"], literals, comments, params, to_char))
    if len(infos) == 1:
        return infos[0]
    main = next((i for i in infos if i.kind != "transaction"), infos[0])
    return StatementInfo(
        pg_parser.fingerprint(sql), "; ".join(i.normalized for i in infos), main.kind,
        _unique([t for i in infos for t in i.tables_read]), _unique([t for i in infos for t in i.tables_written]),
        len(literals), True, tuple(infos))


def _statement_info(sql: str, cs: int, ce: int, stmt: dict, literals, comments, params, to_char) -> StatementInfo:
    (node_type, body), = stmt.items()
    facts = _collect(stmt)
    ctes = facts.ctes
    read = _unique([t for _, t in sorted(facts.read) if t not in ctes])
    written = _unique([t for _, t in sorted(facts.written)])
    conv = (lambda x: x) if to_char is None else to_char
    typmods = {conv(loc) for loc in facts.typmod_locs}
    constants = {conv(loc) for loc in facts.const_locs}
    negatives = {c for c in constants if sql[c:c + 1] == "-"}
    # The fingerprint ignores A_Const nodes only: a literal that is something else (current_timestamp(3),
    # a COMMENT's text, a COPY file name) makes texts differing in it different statements.
    only_constants = True

    # Spans to rewrite inside the statement: literals become $n, comments disappear but for the marker of a line
    # comment (`--`): the way an injected payload cuts off the rest of a statement (`name = 'admin'--'`), which
    # the learner's injection features must still see. Block comments (sqlcommenter tags) leave nothing.
    first_param = 1 + max((int(sql[s + 1:e]) for s, e in params if cs <= s < ce), default=0)
    edits: list[tuple[int, int, str | None]] = []
    count = 0
    for s, e in literals:
        if cs <= s < ce:
            count += 1
            if s in typmods:
                continue
            back = s - 1
            while back > cs and sql[back].isspace():
                back -= 1
            if back in negatives:
                s = back
            elif s not in constants:
                only_constants = False
            edits.append((s, e, "$"))
    for s, e in comments:
        if cs <= s < ce:
            edits.append((s, e, _comment_marker(sql, s)))
    edits.sort()
    out, pos, n = [], cs, first_param
    for s, e, what in edits:
        if s < pos:
            continue
        out.append(sql[pos:s])
        if what == "$":
            out.append(f"${n}")
            n += 1
        else:
            out.append(what)
        pos = e
    out.append(sql[pos:ce])
    normalized = "".join(out).strip()
    text = sql[cs:ce]
    kind = statement_kind(node_type, body)
    return StatementInfo(pg_parser.fingerprint(text), normalized, kind, read, written, count, True,
                         shareable=only_constants and kind in _SHAREABLE_KINDS)


default_analyzer = Analyzer()
analyze = default_analyzer.analyze
