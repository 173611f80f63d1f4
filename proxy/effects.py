"""What a statement does to session state that transaction pooling must carry from backend to backend.

Most statements touch no session state; a cheap regex says so without parsing. The rest are parsed once per
text with pglast (JSON parse tree, no Python AST) and cached: SETs to replay on the next backend, RESETs, and
statements whose effect cannot move between backends (LISTEN, session advisory locks, temp tables, WITH HOLD
cursors, SQL-level PREPARE, LOAD), which pin the client to its backend.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict

import pglast.parser

# A statement can only touch session state if it starts with one of these words (or a comment, which could
# hide one), holds several statements, or mentions one of the few functions and clauses below.
_STATEFUL_HEADS = (b"set", b"reset", b"listen", b"discard", b"prepare", b"deallocate", b"declare", b"load",
                   b"create", b"/*", b"--")
_STATEFUL_WORDS = (b"advisory", b"set_config", b"temp", b"hold")

CURSOR_OPT_HOLD = 0x0020

# Settings that change how fast a query runs, never what it returns or what the session may do.
_PLANNER_ONLY_SETTINGS = frozenset(("jit", "work_mem", "random_page_cost", "seq_page_cost", "enable_seqscan",
                                    "enable_indexscan", "enable_bitmapscan", "enable_hashjoin", "enable_mergejoin",
                                    "enable_nestloop", "max_parallel_workers_per_gather", "plan_cache_mode"))


class Effect:
    """One statement's effect on session state; `index` is its position in a multi-statement text."""

    __slots__ = ("index", "kind", "name", "text", "value")

    SET = "set"            # name, text: a session-level SET to replay
    RESET = "reset"        # name: back to the default
    RESET_ALL = "reset_all"
    DISCARD_ALL = "discard_all"   # RESET ALL + DEALLOCATE ALL + UNLISTEN * + ... on the backend
    DEALLOCATE = "deallocate"     # name (None for ALL): SQL-level DEALLOCATE
    PIN = "pin"            # name: why the client must keep its backend

    def __init__(self, index: int, kind: str, name: str | None = None, text: str | None = None,
                 value: str | None = None):
        self.index = index
        self.kind = kind
        self.name = name
        self.text = text
        self.value = value   # a SET's value as Postgres would show it for simple cases (a, b), else None

    def __repr__(self) -> str:
        return f"Effect({self.index}, {self.kind!r}, {self.name!r})"


_cache: OrderedDict[bytes, tuple[Effect, ...]] = OrderedDict()
_CACHE_MAX = 4096
_NONE: tuple[Effect, ...] = ()


def effects_of(sql: bytes) -> tuple[Effect, ...]:
    """The session effects of a statement text (UTF-8 bytes, no trailing NUL); () for nearly everything."""
    low = sql.lower()
    if not low.lstrip().startswith(_STATEFUL_HEADS) and b";" not in low.rstrip(b" \t\r\n;"):
        for word in _STATEFUL_WORDS:
            if word in low:
                break
        else:
            return _NONE
    hit = _cache.get(sql)
    if hit is not None:
        _cache.move_to_end(sql)
        return hit
    result = _analyse(sql)
    _cache[sql] = result
    if len(_cache) > _CACHE_MAX:
        _cache.popitem(last=False)
    return result


def _analyse(sql: bytes) -> tuple[Effect, ...]:
    try:
        tree = json.loads(pglast.parser.parse_sql_json(sql.decode("utf-8", "replace")))
    except Exception:
        return _NONE  # Postgres will report the syntax error itself
    out: list[Effect] = []
    for i, raw in enumerate(tree.get("stmts", ())):
        stmt = raw.get("stmt", {})
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        text = (sql[start:start + length] if length else sql[start:]).decode("utf-8", "replace").strip()
        eff = _effect_of(i, stmt, text)
        if eff is not None:
            out.append(eff)
    return tuple(out)


def _effect_of(i: int, stmt: dict, text: str) -> Effect | None:
    (node, body), = stmt.items() if len(stmt) == 1 else ((None, None),)
    if node == "VariableSetStmt":
        kind = body.get("kind")
        name = body.get("name")
        if body.get("is_local"):
            return None
        if kind == "VAR_RESET_ALL":
            return Effect(i, Effect.RESET_ALL)
        if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            return Effect(i, Effect.RESET, name)
        if kind == "VAR_SET_MULTI" and name == "TRANSACTION":
            return None  # SET TRANSACTION: this transaction only
        return Effect(i, Effect.SET, name or text, text, _set_value(body.get("args")))
    if node == "DiscardStmt":
        target = body.get("target")
        if target == "DISCARD_ALL":
            return Effect(i, Effect.DISCARD_ALL)
        return None  # DISCARD PLANS/SEQUENCES/TEMP are harmless to move
    if node == "ListenStmt":
        return Effect(i, Effect.PIN, "LISTEN")
    if node == "PrepareStmt":
        return Effect(i, Effect.PIN, "PREPARE")
    if node == "DeallocateStmt":
        return Effect(i, Effect.DEALLOCATE, None if body.get("isall") else body.get("name"))
    if node == "LoadStmt":
        return Effect(i, Effect.PIN, "LOAD")
    if node == "DeclareCursorStmt" and body.get("options", 0) & CURSOR_OPT_HOLD:
        return Effect(i, Effect.PIN, "WITH HOLD cursor")
    if node in ("CreateStmt", "CreateTableAsStmt", "ViewStmt", "CreateSeqStmt"):
        rel = body.get("relation") or body.get("view") or body.get("sequence") or body.get("into", {}).get("rel", {})
        if rel.get("relpersistence") == "t":
            return Effect(i, Effect.PIN, "temporary table")
        return None
    low = text.lower()
    if re.search(r"pg_(?:try_)?advisory_lock(?:_shared)?\s*\(", low):
        return Effect(i, Effect.PIN, "session advisory lock")
    if "set_config" in low:
        names = re.findall(r"set_config\s*\(\s*'([a-z_.]+)'", low)
        if names and all(n in _PLANNER_ONLY_SETTINGS for n in names):
            return None   # e.g. asyncpg's set_config('jit', 'off', false): speed only, nothing to carry or fear
        return Effect(i, Effect.PIN, "set_config()")
    return None


def _set_value(args) -> str | None:
    """The value of `SET x TO a, b` as a string ('a, b'), when every argument is a plain constant."""
    if not args:
        return None
    parts = []
    for a in args:
        const = a.get("A_Const")
        if const is None:
            return None
        for k in ("sval", "ival", "fval", "boolval"):
            if k in const:
                v = const[k]
                v = next(iter(v.values()), "") if isinstance(v, dict) else v
                parts.append(str(v).lower() if k == "boolval" else str(v))
                break
        else:
            return None
    return ", ".join(parts)
