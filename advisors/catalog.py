"""What the advisors know about a database: tables, columns with their statistics, indexes and their usage.

Read once per run from the catalogs and pg_stat views (psycopg 3 connection); system schemas and
pgpilot's own schemas are left out, so the advisors never advise on the log store itself.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from pglast import keywords

EXCLUDED_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", "pgpilot")
SCRATCH_SCHEMA_PREFIX = "pgpilot_scratch"

_BARE = re.compile(r"^[a-z_][a-z0-9_$]*$")
_RESERVED = keywords.RESERVED_KEYWORDS | keywords.TYPE_FUNC_NAME_KEYWORDS | keywords.COL_NAME_KEYWORDS


def quote_ident(name: str) -> str:
    """An identifier as PostgreSQL wants it written: bare when it can be, double-quoted otherwise."""
    if _BARE.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def parse_bytes(text: str | int) -> int:
    """'500MB', '1.5 GB', '8kB', 1024 -> bytes (binary multiples, as PostgreSQL's units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass
class Column:
    name: str
    type: str
    attnum: int
    not_null: bool
    n_distinct: float | None = None      # absolute estimate (negative pg_stats values resolved)
    null_frac: float | None = None
    correlation: float | None = None
    avg_width: int | None = None
    most_common_vals: list[str] | None = None
    most_common_freqs: list[float] | None = None
    histogram_bounds: list[str] | None = None

    @property
    def is_temporal(self) -> bool:
        return self.type.startswith(("timestamp", "date"))


@dataclass
class Index:
    oid: int
    name: str
    schema: str
    table: str                   # qualified table name
    method: str
    columns: tuple[str, ...]     # key columns; expressions as their text
    include: tuple[str, ...]
    predicate: str | None
    is_unique: bool
    is_primary: bool
    is_constraint: bool          # backs a PRIMARY KEY / UNIQUE / EXCLUDE constraint
    is_valid: bool
    size_bytes: int
    idx_scan: int | None
    definition: str

    @property
    def qualified_name(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


@dataclass
class Table:
    oid: int
    schema: str
    name: str
    kind: str                    # r: table, p: partitioned table
    reltuples: float
    relpages: int
    heap_bytes: int
    total_bytes: int
    columns: dict[str, Column] = field(default_factory=dict)
    indexes: list[Index] = field(default_factory=list)
    n_live_tup: int = 0
    n_tup_ins: int = 0
    n_tup_upd: int = 0
    n_tup_del: int = 0
    seq_scan: int = 0
    foreign_keys_in: list[str] = field(default_factory=list)   # constraints elsewhere referencing this table

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql_name(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def rows(self) -> float:
        return max(self.reltuples, float(self.n_live_tup), 0.0)


@dataclass
class Catalog:
    database: str
    tables: dict[str, Table]
    search_path: list[str]
    settings: dict[str, str]
    stats_since: dt.datetime | None        # statistics reset (or server start when never reset)
    now: dt.datetime
    server_version: int

    def resolve(self, name: str) -> Table | None:
        """A table by `schema.name` or by bare name along the search path."""
        if "." in name:
            return self.tables.get(name)
        for schema in self.search_path:
            table = self.tables.get(f"{schema}.{name}")
            if table is not None:
                return table
        return None

    def setting_bytes(self, name: str) -> int | None:
        """A memory setting (shared_buffers, effective_cache_size...) in bytes."""
        raw = self.settings.get(name)
        unit = self.settings.get(name + ".unit") or ""
        if raw is None:
            return None
        m = re.fullmatch(r"(\d*)(kB|MB|GB|B)?", unit)
        mult = int(m.group(1) or 1) * {"kB": 1024, "MB": 1 << 20, "GB": 1 << 30, "B": 1, None: 1}[m.group(2)]
        return int(raw) * mult

    @property
    def stats_window(self) -> dt.timedelta | None:
        return self.now - self.stats_since if self.stats_since else None


def _pg_array(text: str | None) -> list[str] | None:
    """A PostgreSQL array literal's elements (anyarray columns of pg_stats come as text)."""
    if text is None:
        return None
    inner = text[1:-1]
    out, cur, quoted, i = [], [], False, 0
    while i < len(inner):
        ch = inner[i]
        if quoted:
            if ch == "\\":
                i += 1
                cur.append(inner[i])
            elif ch == '"':
                quoted = False
            else:
                cur.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def load_catalog(conn, only_schema: str | None = None) -> Catalog:
    """Read the catalog of the database `conn` is connected to (or of one schema, scratch ones included)."""
    excluded = list(EXCLUDED_SCHEMAS)
    row = conn.execute("""SELECT current_database(), current_schemas(false), now(),
                                 coalesce((SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()),
                                          pg_postmaster_start_time()),
                                 current_setting('server_version_num')::int""").fetchone()
    database, search_path, now, stats_since, version = row
    settings = {}
    for name, value, unit in conn.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)",
            (["shared_buffers", "effective_cache_size", "block_size", "random_page_cost", "seq_page_cost",
              "cpu_tuple_cost", "cpu_index_tuple_cost", "work_mem", "max_parallel_workers_per_gather"],)):
        settings[name] = value
        settings[name + ".unit"] = unit
    tables: dict[str, Table] = {}
    by_oid: dict[int, Table] = {}
    for (oid, schema, name, kind, reltuples, relpages, heap, total, live, ins, upd, dele, seq) in conn.execute(
            """SELECT c.oid, n.nspname, c.relname, c.relkind, c.reltuples, c.relpages,
                      pg_relation_size(c.oid), pg_total_relation_size(c.oid),
                      coalesce(s.n_live_tup, 0), coalesce(s.n_tup_ins, 0), coalesce(s.n_tup_upd, 0),
                      coalesce(s.n_tup_del, 0), coalesce(s.seq_scan, 0)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
               WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                 AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_temp%%'
                 AND (n.nspname = %s OR %s::text IS NULL AND n.nspname NOT LIKE %s)""",
            (excluded, only_schema, only_schema, SCRATCH_SCHEMA_PREFIX + "%")):
        if kind == "p":  # a partitioned table's size is the sum of its partitions
            heap, total = conn.execute(
                """SELECT coalesce(sum(pg_relation_size(relid)), 0), coalesce(sum(pg_total_relation_size(relid)), 0)
                   FROM pg_partition_tree(%s) WHERE isleaf""", (oid,)).fetchone()
        t = Table(oid, schema, name, kind, float(reltuples), int(relpages), int(heap), int(total),
                  n_live_tup=live, n_tup_ins=ins, n_tup_upd=upd, n_tup_del=dele, seq_scan=seq)
        tables[t.qualified] = t
        by_oid[oid] = t
    if not by_oid:
        return Catalog(database, tables, list(search_path), settings, stats_since, now, version)
    oids = list(by_oid)
    for (relid, attname, typ, attnum, notnull) in conn.execute(
            """SELECT attrelid, attname, format_type(atttypid, atttypmod), attnum, attnotnull
               FROM pg_attribute WHERE attrelid = ANY(%s) AND attnum > 0 AND NOT attisdropped
               ORDER BY attrelid, attnum""", (oids,)):
        by_oid[relid].columns[attname] = Column(attname, typ, attnum, notnull)
    for (schema, name, attname, inherited, null_frac, n_distinct, correlation, width, mcv, mcf, hist) in conn.execute(
            """SELECT schemaname, tablename, attname, inherited, null_frac, n_distinct, correlation, avg_width,
                      most_common_vals::text, most_common_freqs, histogram_bounds::text
               FROM pg_stats WHERE schemaname <> ALL(%s)""", (excluded,)):
        t = tables.get(f"{schema}.{name}")
        col = t.columns.get(attname) if t else None
        # A partitioned table only has statistics over its whole tree (inherited).
        if col is None or inherited != (t.kind == "p"):
            continue
        col.null_frac, col.correlation, col.avg_width = null_frac, correlation, width
        col.n_distinct = n_distinct if n_distinct >= 0 else -n_distinct * max(t.rows, 1.0)
        col.most_common_vals, col.most_common_freqs = _pg_array(mcv), mcf
        col.histogram_bounds = _pg_array(hist)
    for (ioid, iname, ischema, relid, am, nkey, keydefs, pred, unique, primary, constraint, valid, size, scans,
         definition) in conn.execute(
            """SELECT i.indexrelid, ic.relname, n.nspname, i.indrelid, am.amname, i.indnkeyatts,
                      array(SELECT pg_get_indexdef(i.indexrelid, k, true)
                            FROM generate_series(1, i.indnatts) k ORDER BY k),
                      pg_get_expr(i.indpred, i.indrelid, true), i.indisunique, i.indisprimary,
                      EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid
                              AND c.contype IN ('p', 'u', 'x')),
                      i.indisvalid AND i.indisready, pg_relation_size(i.indexrelid), s.idx_scan,
                      pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_namespace n ON n.oid = ic.relnamespace JOIN pg_am am ON am.oid = ic.relam
               LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid
               WHERE i.indrelid = ANY(%s) ORDER BY i.indexrelid""", (oids,)):
        t = by_oid[relid]
        t.indexes.append(Index(ioid, iname, ischema, t.qualified, am, tuple(keydefs[:nkey]),
                               tuple(keydefs[nkey:]), pred, unique, primary, constraint, valid, int(size),
                               scans, definition))
    for (confrelid, conname, relname) in conn.execute(
            """SELECT c.confrelid, c.conname, c.conrelid::regclass::text FROM pg_constraint c
               WHERE c.contype = 'f' AND c.confrelid = ANY(%s)""", (oids,)):
        by_oid[confrelid].foreign_keys_in.append(f"{conname} on {relname}")
    return Catalog(database, tables, list(search_path), settings, stats_since, now, version)
