"""Who asks and under which settings: the part of a cache key that belongs to the client session.

A session builds one CacheContext per settings state and reuses it, so everything derived from it (the key
digest, the scope under which statement verdicts are cached, the expanded search_path) is computed once here.
"""
from __future__ import annotations

import hashlib
import re

# Session settings that change the bytes of a result (or how a text parses), by lower-cased name. The session
# passes those it knows; a missing one means the server default, which is part of the catalog state.
KEY_SETTINGS = ("search_path", "timezone", "datestyle", "intervalstyle", "client_encoding",
                "extra_float_digits", "bytea_output", "standard_conforming_strings", "lc_monetary",
                "timezone_abbreviations", "transform_null_equals", "xmloption")

_scopes: dict[tuple, int] = {}


def _scope_id(database: str, role: str, search_path: str, refusal: str | None) -> int:
    key = (database, role, search_path, refusal)
    sid = _scopes.get(key)
    if sid is None:
        sid = _scopes[key] = len(_scopes) + 1
    return sid


_PATH_ELEMENT = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^,\s"]+))\s*(?:,|\Z)')


def split_search_path(value: str) -> list[str]:
    """The schema names of a search_path value, as Postgres splits it: quoted names kept, others lower-cased
    ("$user" stays as the marker $user). An unsplittable value gives what could be read before the problem."""
    names, pos = [], 0
    value = value.strip()
    while pos < len(value):
        m = _PATH_ELEMENT.match(value, pos)
        if m is None or m.end() == pos:
            break
        names.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).lower())
        pos = m.end()
    return [n for n in names if n]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class CacheContext:
    """The database, role and byte-changing settings of a client session (settings keyed case-insensitively)."""

    __slots__ = ("database", "role", "settings", "digest", "scope", "search_path", "schemas", "refusal")

    def __init__(self, database: str, role: str, settings: dict[str, str]):
        self.database = database
        self.role = role
        norm = {k.lower(): str(v) for k, v in settings.items()}
        self.settings = norm
        self.search_path = norm.get("search_path", '"$user", public')
        h = hashlib.blake2b(digest_size=16)
        for part in (database, role, *[f"{k}={v}" for k, v in sorted(norm.items())]):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        self.digest = h.digest()
        # Texts are analysed as UTF-8 with standard strings; a session lexing them otherwise is not served.
        self.refusal: str | None = None
        if norm.get("standard_conforming_strings", "on").lower() in ("off", "false", "no", "0"):
            self.refusal = "nonstandard_strings"
        elif re.sub(r"[^0-9A-Z]", "", norm.get("client_encoding", "UTF8").upper()) not in ("UTF8", "UNICODE", "SQLASCII"):
            # Postgres ignores everything but letters and digits in encoding names ('utf-8', "'utf-8'", UTF8).
            self.refusal = "client_encoding"
        # Verdicts depend on name resolution (search_path with $user expanded) and the role's privileges.
        self.scope = _scope_id(database, role, self.search_path, self.refusal)
        self.schemas = tuple(role if s == "$user" else s for s in split_search_path(self.search_path))

    @property
    def resolved_search_path(self) -> str:
        """The search_path with $user replaced by the role, for a connection running as someone else."""
        return ", ".join(quote_ident(s) for s in self.schemas)

    def __repr__(self) -> str:
        return f"CacheContext({self.database!r}, {self.role!r}, search_path={self.search_path!r})"
