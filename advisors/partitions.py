"""The partition advisor: whether to partition a table, how (range, list or hash; key; interval), and a plan.

Signals come from the data (pg_stats histograms and correlation of time columns, size against
shared_buffers and effective_cache_size, row growth from the collectors' table_stats snapshots) and from the
logged workload (range predicates on a time column, equality on a tenant-like column, retention DELETEs).
The answer is a strategy or an explicit "do not partition" with its reason. A strategy comes with an
implementation plan (create the partitioned table, its partitions, a maintenance function, copy in batches,
swap names) that is validated by running it on a sample copy in a scratch schema and comparing the
EXPLAIN costs of the affected templates before and after.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field

from pglast import ast, parse_sql
from pglast.stream import RawStream

from advisors.catalog import (SCRATCH_SCHEMA_PREFIX, Catalog, Table, format_bytes, load_catalog, parse_bytes,
                              quote_ident, quote_literal)
from advisors.workload import Template, Workload, render_literal
from advisors.whatif import plan_values

log = logging.getLogger("pgpilot.advisors")

_TENANT = re.compile(r"(^|_)(tenant|account|org|organization|organisation|customer|company|client|shop|store|"
                     r"workspace|project|team|site)(_?id|_key)?$")
_TIME_NAME = re.compile(r"(^|_)(ts|time|timestamp|date|created|created_at|inserted_at|occurred_at|event_time|day)$")
INTERVALS = {"day": 1.0, "week": 7.0, "month": 30.44, "year": 365.25}
_SUFFIX_FORMAT = {"day": "YYYY_MM_DD", "week": "YYYY_MM_DD", "month": "YYYY_MM", "year": "YYYY"}


@dataclass
class PlanStep:
    title: str
    sql: str


@dataclass
class TemplateCheck:
    fingerprint: str
    label: str
    calls: float
    cost_flat: float | None
    cost_partitioned: float | None
    partitions_scanned: int | None
    partitions_total: int | None


@dataclass
class PartitionAdvice:
    table: str
    decision: str                      # partition | do not partition
    reason: str
    strategy: str | None = None        # range | list | hash
    key: str | None = None
    interval: str | None = None        # range: day | week | month | year
    modulus: int | None = None         # hash
    values: list[str] = field(default_factory=list)   # list: values given their own partition
    rows: float = 0.0
    total_bytes: int = 0
    signals: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    steps: list[PlanStep] = field(default_factory=list)
    validation: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def script(self) -> str:
        lines = [f"-- pgpilot partition plan for {self.table}: {self.strategy} on {self.key}"
                 + (f" by {self.interval}" if self.interval else "")]
        for w in self.warnings:
            lines.append(f"-- warning: {w}")
        for i, step in enumerate(self.steps, 1):
            lines.append(f"\n-- {i}. {step.title}")
            lines.append(step.sql.rstrip().rstrip(";") + ";")
        return "\n".join(lines) + "\n"


# -- signals ----------------------------------------------------------------------------------------------------

def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace(" ", "T", 1)) if "T" not in text else \
            dt.datetime.fromisoformat(text)
    except ValueError:
        try:
            value = dt.datetime.fromisoformat(text[:19])
        except ValueError:
            return None
    return value.replace(tzinfo=None) if value.tzinfo else value


def _calls_with(templates: list[Template], table: str, test) -> float:
    total = 0.0
    for t in templates:
        if any(test(a) for a in t.shape.accesses_of(table)):
            total += t.calls
    return total


def table_growth(log_conn, table: Table, database: str) -> float | None:
    """Rows per day from the collectors' table_stats snapshots (first and last within 30 days), if any."""
    if log_conn is None:
        return None
    exists = log_conn.execute("SELECT to_regclass('pgpilot.table_stats') IS NOT NULL").fetchone()[0]
    if not exists:
        return None
    rows = log_conn.execute(
        """SELECT ts, n_live_tup FROM pgpilot.table_stats
           WHERE database = %s AND schemaname = %s AND relname = %s AND ts >= now() - interval '30 days'
           ORDER BY ts""", (database, table.schema, table.name)).fetchall()
    if len(rows) < 2 or rows[-1][0] == rows[0][0]:
        return None
    days = (rows[-1][0] - rows[0][0]).total_seconds() / 86400
    return (rows[-1][1] - rows[0][1]) / days if days >= 0.01 else None


def _retention(t: Template, table: str, col: str) -> dt.timedelta | None:
    """How far back a logged retention DELETE cuts, from its logged values (None when unknown)."""
    ages = []
    for access in t.shape.accesses_of(table):
        for op, value in access.ranges.get(col, []):
            if op in ("<", "<=") and value.kind == "param":
                for params in t.logged_params:
                    cut = _parse_time(params[value.param - 1]) if len(params) >= value.param and \
                        params[value.param - 1] else None
                    if cut is not None:
                        ages.append(cut)
    if not ages:
        return None
    ages.sort()
    return ages[len(ages) // 2]


def collect_signals(table: Table, workload: Workload, catalog: Catalog, log_conn=None) -> dict:
    name = table.qualified
    templates = [t for t in workload.templates if name in t.tables]
    reading = [t for t in templates if t.shape.accesses_of(name)]
    calls = sum(t.calls for t in reading)
    time_cols = [c for c in table.columns.values() if c.is_temporal]

    def time_use(col: str) -> float:
        return _calls_with(reading, name, lambda a: col in a.ranges or col in a.equality)

    def time_rank(c) -> tuple:
        return (time_use(c.name), abs(c.correlation or 0.0), bool(_TIME_NAME.search(c.name)))

    time_col = max(time_cols, key=time_rank) if time_cols else None
    deletes = [t for t in templates if t.kind == "delete" and t.shape.written_table is not None
               and t.shape.written_table.qualified == name]
    retention_deletes = [t for t in deletes if time_col is not None and any(
        any(op in ("<", "<=") for op, _ in a.ranges.get(time_col.name, [])) for a in t.shape.accesses_of(name))]
    tenants = {}
    for col in table.columns.values():
        if col.name == (time_col.name if time_col else None):
            continue
        share = _calls_with(reading, name, lambda a, c=col.name: c in a.equality) / calls if calls else 0.0
        nd = col.n_distinct or 0
        if share > 0 and 1 < nd <= max(2.0, 0.05 * table.rows) and (
                _TENANT.search(col.name) or share >= 0.8):
            tenants[col.name] = (share, nd)
    span_days = first = last = None
    if time_col is not None and time_col.histogram_bounds:
        first = _parse_time(time_col.histogram_bounds[0])
        last = _parse_time(time_col.histogram_bounds[-1])
        if first and last:
            span_days = max((last - first).total_seconds() / 86400, 1.0)
    cutoff = None
    for t in retention_deletes:
        cutoff = cutoff or _retention(t, name, time_col.name)
    retention_days = None
    if cutoff is not None and last is not None:
        retention_days = max(1.0, (last - cutoff).total_seconds() / 86400)
    return {
        "rows": table.rows, "total_bytes": table.total_bytes,
        "shared_buffers_bytes": catalog.setting_bytes("shared_buffers"),
        "effective_cache_size_bytes": catalog.setting_bytes("effective_cache_size"),
        "growth_rows_per_day": table_growth(log_conn, table, catalog.database),
        "calls": calls,
        "time_column": time_col.name if time_col else None,
        "time_column_type": time_col.type if time_col else None,
        "time_correlation": time_col.correlation if time_col else None,
        "time_first": first.isoformat() if first else None,
        "time_last": last.isoformat() if last else None,
        "time_span_days": span_days,
        "time_filter_share": (time_use(time_col.name) / calls) if (time_col and calls) else 0.0,
        "retention_deletes": len(retention_deletes),
        "retention_delete_calls": sum(t.calls for t in retention_deletes),
        "retention_days": retention_days,
        "tenant_columns": {k: {"share": round(v[0], 3), "n_distinct": v[1]} for k, v in tenants.items()},
        "referenced_by_foreign_keys": list(table.foreign_keys_in),
    }


def choose_interval(rows: float, span_days: float, min_rows: int, max_partitions: int, ahead: int) -> str:
    """The finest of day/week/month/year whose partitions hold at least min_rows and stay few enough."""
    rows_per_day = rows / max(span_days, 1.0)
    for unit, days in INTERVALS.items():
        count = span_days / days + ahead
        if rows_per_day * days >= min_rows and count <= max_partitions:
            return unit
    return "year"


def decide(table: Table, signals: dict, settings) -> PartitionAdvice:
    """The strategy, or why not to partition."""
    name = table.qualified
    min_bytes = parse_bytes(settings.partition_min_table_bytes)
    rows = signals["rows"]
    growth = signals.get("growth_rows_per_day")
    projected = table.total_bytes
    if growth and rows > 0:
        projected = int(table.total_bytes * (1 + max(growth, 0) * 90 / rows))  # in 90 days
    big = projected >= min_bytes
    retention = signals["retention_deletes"] > 0
    advice = PartitionAdvice(name, "do not partition", "", rows=rows, total_bytes=table.total_bytes,
                             signals=signals)
    cache = signals.get("effective_cache_size_bytes") or 0
    size_text = f"{format_bytes(table.total_bytes)}" + (
        f" (about {format_bytes(projected)} in 90 days)" if projected > table.total_bytes * 1.05 else "")
    if table.kind == "p":
        advice.reason = "already partitioned"
        return advice
    if rows < 2 * settings.partition_min_rows:
        advice.reason = (f"{rows:.0f} rows, {size_text}: too small for partitions of at least "
                         f"{settings.partition_min_rows} rows; indexes serve it better")
        return advice
    if not big and not retention:
        fits = (f", it fits in effective_cache_size ({format_bytes(cache)})"
                if cache and table.total_bytes < cache else "")
        advice.reason = (f"{size_text} is below partition_min_table_bytes ({format_bytes(min_bytes)}){fits}, "
                         "and no retention DELETE was logged")
        return advice
    time_col = signals["time_column"]
    if time_col and (signals["time_filter_share"] >= 0.5 or retention) and signals["time_span_days"]:
        advice.decision, advice.strategy, advice.key = "partition", "range", time_col
        advice.interval = choose_interval(rows, signals["time_span_days"], settings.partition_min_rows,
                                          settings.partition_max_partitions, settings.partition_ahead)
        why = []
        if signals["time_filter_share"] >= 0.5:
            why.append(f"{signals['time_filter_share']:.0%} of its reads filter on {time_col}")
        if retention:
            why.append(f"{signals['retention_delete_calls']:.0f} retention DELETE(s) on {time_col} can become "
                       "DROP of old partitions")
        if big:
            why.append(f"it is {size_text}")
        advice.reason = "; ".join(why)
    elif signals["tenant_columns"] and big:
        col, info = max(signals["tenant_columns"].items(), key=lambda kv: kv[1]["share"])
        if info["share"] < 0.8:
            advice.reason = f"{col} filters only {info['share']:.0%} of reads; partitions would rarely be pruned"
            return advice
        advice.decision, advice.key = "partition", col
        column = table.columns[col]
        if info["n_distinct"] <= 64 and column.most_common_vals:
            advice.strategy = "list"
            advice.values = list(column.most_common_vals[:64])
            advice.reason = f"{info['share']:.0%} of reads filter on {col} = value, {info['n_distinct']:.0f} values"
        else:
            advice.strategy = "hash"
            advice.modulus = 2 ** min(6, max(2, math.ceil(math.log2(max(projected / (1 << 30), 1.0))) + 2))
            advice.reason = f"{info['share']:.0%} of reads filter on {col} = value, {info['n_distinct']:.0f} values"
    else:
        advice.reason = (f"{size_text}, but no column filters most of its reads (time filters: "
                         f"{signals['time_filter_share']:.0%}) and no retention DELETE was logged: "
                         "partitions would not be pruned")
        return advice
    if signals["referenced_by_foreign_keys"]:
        advice.warnings.append("referenced by foreign keys (" + ", ".join(signals["referenced_by_foreign_keys"])
                               + "): they need a unique key that includes the partition key; recreate them")
    return advice


# -- the plan ---------------------------------------------------------------------------------------------------

def _owned_sequences(conn, table: Table) -> list[tuple[str, str]]:
    """(sequence, column) pairs owned by the table's columns (serial / bigserial)."""
    return conn.execute(
        """SELECT s.oid::regclass::text, a.attname FROM pg_depend d
           JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
           WHERE d.refobjid = %s AND d.deptype = 'a'""", (table.oid,)).fetchall()


def _identity_columns(conn, table: Table) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attidentity <> '' AND NOT attisdropped",
        (table.oid,))]


def _generated_columns(conn, table: Table) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attgenerated <> '' AND NOT attisdropped",
        (table.oid,))}


def _dependent_views(conn, table: Table) -> list[str]:
    return [r[0] for r in conn.execute(
        """SELECT DISTINCT v.oid::regclass::text FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
           JOIN pg_class v ON v.oid = r.ev_class
           WHERE d.refobjid = %s AND v.oid <> %s""", (table.oid, table.oid))]


def build_plan(conn, table: Table, advice: PartitionAdvice, ahead: int = 3, batch_pages: int = 1000) -> None:
    """Fill advice.steps (and warnings) with the SQL that moves `table` to the advised layout."""
    schema, name = table.schema, table.name
    q = quote_ident
    old = table.sql_name
    new_name = f"{name}_partitioned"[:63]
    new = f"{q(schema)}.{q(new_name)}"
    retired = f"{name}_unpartitioned"[:63]
    key = advice.key
    key_type = table.columns[key].type
    steps: list[PlanStep] = []
    method = {"range": "RANGE", "list": "LIST", "hash": "HASH"}[advice.strategy]
    steps.append(PlanStep(
        "the partitioned table, with the same columns, defaults, checks and NOT NULLs",
        f"CREATE TABLE {new} (LIKE {old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED "
        f"INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMMENTS INCLUDING STATISTICS) "
        f"PARTITION BY {method} ({q(key)})"))
    for idx in table.indexes:
        if not idx.is_valid:
            continue
        cols = list(idx.columns)
        if idx.is_primary or idx.is_constraint:
            if key not in cols:
                advice.warnings.append(
                    f"{idx.name} becomes ({', '.join(cols + [key])}): a unique key on a partitioned table must "
                    f"include {key}, so ({', '.join(cols)}) alone is no longer enforced as unique")
                cols.append(key)
            kind = "PRIMARY KEY" if idx.is_primary else "UNIQUE"
            steps.append(PlanStep(f"{kind.lower()} (was {idx.name})",
                                  f"ALTER TABLE {new} ADD {kind} ({', '.join(q(c) for c in cols)})"))
            continue
        definition = re.sub(r"^CREATE (UNIQUE )?INDEX \S+ ON (ONLY )?\S+ ",
                            lambda m: f"CREATE {m.group(1) or ''}INDEX ON {new} ", idx.definition)
        if idx.is_unique and key not in idx.columns:
            advice.warnings.append(f"unique index {idx.name} cannot be kept unique without {key}: made non-unique")
            definition = definition.replace("CREATE UNIQUE INDEX", "CREATE INDEX", 1)
        steps.append(PlanStep(f"index (was {idx.name})", definition))
    default_part = f"{q(schema)}.{q((name + '_default')[:63])}"
    if advice.strategy == "range":
        unit = advice.interval
        fn = f"{q(schema)}.{q((name + '_maintain_partitions')[:63])}"
        cast = {"date": "::date"}.get(key_type, "::timestamp" if key_type.startswith("timestamp without")
                                       else "")
        suffix = _SUFFIX_FORMAT[unit]
        keep = advice.signals.get("retention_days")
        retention_default = f"interval '{math.ceil(keep)} days'" if keep else "NULL"
        steps.append(PlanStep(
            f"maintenance: creates {unit} partitions up to {ahead} ahead and drops those past the retention; "
            f"run it daily (cron or pg_cron: SELECT {fn}();)",
            f"""CREATE OR REPLACE FUNCTION {fn}(start_at timestamptz DEFAULT now(), until_at timestamptz DEFAULT now(),
    retention interval DEFAULT {retention_default}) RETURNS integer
LANGUAGE plpgsql SET TimeZone = 'UTC' AS $fn$
DECLARE
  d timestamptz := date_trunc('{unit}', start_at);
  stop timestamptz := date_trunc('{unit}', until_at) + interval '1 {unit}' * {ahead + 1};
  part text;
  created integer := 0;
BEGIN
  WHILE d < stop LOOP
    part := {quote_literal(name[:50] + '_p')} || to_char(d, {quote_literal(suffix)});
    IF to_regclass(format('%I.%I', {quote_literal(schema)}, part)) IS NULL THEN
      EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                     {quote_literal(schema)}, part, {quote_literal(f"{q(schema)}.{q(name)}")}::regclass,
                     (d){cast}, (d + interval '1 {unit}'){cast});
      created := created + 1;
    END IF;
    d := d + interval '1 {unit}';
  END LOOP;
  IF retention IS NOT NULL THEN
    FOR part IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = {quote_literal(f"{q(schema)}.{q(name)}")}::regclass
                  AND c.relname ~ ('^' || {quote_literal(name[:50] + '_p')} || '[0-9]')
    LOOP
      IF to_timestamp(substr(part, length({quote_literal(name[:50] + '_p')}) + 1), {quote_literal(suffix)})
         + interval '1 {unit}' <= now() - retention THEN
        EXECUTE format('DROP TABLE %I.%I', {quote_literal(schema)}, part);
      END IF;
    END LOOP;
  END IF;
  RETURN created;
END
$fn$"""))
        # The function names partitions after the final table name; while building, they hang off the new one.
        steps[-1].sql = steps[-1].sql.replace(quote_literal(f"{q(schema)}.{q(name)}") + "::regclass",
                                              "coalesce(to_regclass(" + quote_literal(new) + "), "
                                              + quote_literal(f"{q(schema)}.{q(name)}") + "::regclass)")
        steps.append(PlanStep(
            "partitions for the existing rows plus a few ahead, and a default partition for anything else",
            f"SELECT {fn}((SELECT min({q(key)}) FROM {old})::timestamptz, "
            f"(SELECT max({q(key)}) FROM {old})::timestamptz, NULL)"))
        steps.append(PlanStep("default partition (NULL keys, far past or future)",
                              f"CREATE TABLE {default_part} PARTITION OF {new} DEFAULT"))
    elif advice.strategy == "list":
        for i, value in enumerate(advice.values):
            part = f"{q(schema)}.{q(f'{name[:50]}_l{i}')}"
            steps.append(PlanStep(f"partition for {key} = {value}",
                                  f"CREATE TABLE {part} PARTITION OF {new} FOR VALUES IN ({quote_literal(value)})"))
        steps.append(PlanStep("default partition (other values)",
                              f"CREATE TABLE {default_part} PARTITION OF {new} DEFAULT"))
    else:
        for r in range(advice.modulus):
            part = f"{q(schema)}.{q(f'{name[:50]}_h{r}')}"
            steps.append(PlanStep(f"hash partition {r} of {advice.modulus}",
                                  f"CREATE TABLE {part} PARTITION OF {new} "
                                  f"FOR VALUES WITH (MODULUS {advice.modulus}, REMAINDER {r})"))
    generated = _generated_columns(conn, table)
    columns = ", ".join(q(c) for c in table.columns if c not in generated)
    overriding = " OVERRIDING SYSTEM VALUE" if _identity_columns(conn, table) else ""
    owned = _owned_sequences(conn, table)
    identity = _identity_columns(conn, table)
    after_swap = "".join(
        f"\n  ALTER SEQUENCE {seq} OWNED BY {q(schema)}.{q(name)}.{q(col)};" for seq, col in owned)
    after_swap += "".join(
        f"\n  PERFORM setval(pg_get_serial_sequence({quote_literal(f'{q(schema)}.{q(name)}')}, {quote_literal(col)}),"
        f" coalesce((SELECT max({q(col)}) FROM {q(schema)}.{q(name)}), 0) + 1, false);" for col in identity)
    steps.append(PlanStep(
        f"copy in batches of {batch_pages} pages (one transaction each), then swap the names under a lock. "
        "Rows appended during the copy are caught up; rows updated or deleted in already-copied pages are "
        "not: pause such writes, or the row counts differ and nothing is swapped",
        f"""DO $copy$
DECLARE
  pages bigint := pg_relation_size({quote_literal(old)}) / current_setting('block_size')::int;
  p bigint := 0;
  old_rows bigint;
  new_rows bigint;
BEGIN
  WHILE p < pages LOOP
    INSERT INTO {new} ({columns}){overriding}
      SELECT {columns} FROM {old}
      WHERE ctid >= format('(%s,0)', p)::tid AND ctid < format('(%s,0)', p + {batch_pages})::tid;
    p := p + {batch_pages};
    COMMIT;
  END LOOP;
  LOCK TABLE {old} IN ACCESS EXCLUSIVE MODE;
  INSERT INTO {new} ({columns}){overriding}
    SELECT {columns} FROM {old} WHERE ctid >= format('(%s,0)', p)::tid;
  SELECT count(*) INTO old_rows FROM {old};
  SELECT count(*) INTO new_rows FROM {new};
  IF old_rows <> new_rows THEN
    RAISE EXCEPTION 'row counts differ (% before, % copied): rows changed during the copy; nothing swapped',
      old_rows, new_rows;
  END IF;
  ALTER TABLE {old} RENAME TO {q(retired)};
  ALTER TABLE {new} RENAME TO {q(name)};{after_swap}
END
$copy$"""))
    steps.append(PlanStep("statistics for the new layout", f"ANALYZE {q(schema)}.{q(name)}"))
    steps.append(PlanStep(
        f"after checking the application: drop the old table ({q(schema)}.{q(retired)})",
        f"-- DROP TABLE {q(schema)}.{q(retired)}"))
    views = _dependent_views(conn, table)
    if views:
        advice.warnings.append("views still read the old table after the swap and must be recreated: "
                               + ", ".join(views))
    advice.warnings.append("grants, triggers, policies and publications of the old table are not copied")
    advice.steps = steps


# -- validation -------------------------------------------------------------------------------------------------

def _retarget(sql: str, table: Table, catalog: Catalog, schema: str, relname: str) -> str | None:
    """The statement with every reference to `table` pointed at schema.relname (pglast rewrite)."""
    try:
        stmts = parse_sql(sql)
    except Exception:
        return None

    def walk(node) -> None:
        if isinstance(node, ast.RangeVar):
            ref = f"{node.schemaname}.{node.relname}" if node.schemaname else node.relname
            resolved = catalog.resolve(ref)
            if resolved is not None and resolved.oid == table.oid:
                node.schemaname, node.relname = schema, relname
        if isinstance(node, ast.Node):
            for attr in node:
                walk(getattr(node, attr))
        elif isinstance(node, tuple):
            for item in node:
                walk(item)

    walk(stmts)
    return RawStream()(stmts[0])


def _explain_cost(conn, sql: str) -> tuple[float, list[str]] | None:
    try:
        row = conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()
    except Exception as e:
        log.debug("validation explain failed: %s", e)
        return None
    plan = row[0][0]["Plan"]
    return plan["Total Cost"], plan_values(plan, "Relation Name")


def validate(conn, table: Table, advice: PartitionAdvice, workload: Workload, catalog: Catalog,
             sample_percent: float, settings) -> dict:
    """Run the plan on a sample copy in a scratch schema; compare the templates' costs flat vs partitioned."""
    scratch = f"{SCRATCH_SCHEMA_PREFIX}_{os.getpid()}"
    q = quote_ident
    # A few percent of a big table is still big: at most about 200,000 rows are copied.
    sample_percent = round(min(sample_percent, 100.0 * 200_000 / max(table.rows, 1.0)), 4)
    result: dict = {"sample_percent": sample_percent, "scratch_schema": scratch}
    conn.execute(f"DROP SCHEMA IF EXISTS {q(scratch)} CASCADE")
    conn.execute(f"CREATE SCHEMA {q(scratch)}")
    try:
        copy = f"{q(scratch)}.{q(table.name)}"
        conn.execute(f"CREATE TABLE {copy} (LIKE {table.sql_name} INCLUDING ALL)")
        generated = _generated_columns(conn, table)
        cols = ", ".join(q(c) for c in table.columns if c not in generated)
        overriding = " OVERRIDING SYSTEM VALUE" if _identity_columns(conn, table) else ""
        conn.execute(f"INSERT INTO {copy} ({cols}){overriding} SELECT {cols} FROM {table.sql_name} "
                     f"TABLESAMPLE BERNOULLI ({float(sample_percent)}) REPEATABLE (42)")
        conn.execute(f"ANALYZE {copy}")
        sample_rows = conn.execute(f"SELECT count(*) FROM {copy}").fetchone()[0]
        scratch_catalog = load_catalog(conn, only_schema=scratch)
        sample_table = scratch_catalog.tables[f"{scratch}.{table.name}"]
        trial = PartitionAdvice(sample_table.qualified, advice.decision, advice.reason, advice.strategy,
                                advice.key, advice.interval, advice.modulus, list(advice.values),
                                signals=advice.signals)
        build_plan(conn, sample_table, trial, ahead=settings.partition_ahead, batch_pages=50)
        for step in trial.steps:
            if step.sql.startswith("--"):
                continue
            conn.execute(step.sql)
        retired = f"{table.name}_unpartitioned"[:63]
        part_rows = conn.execute(f"SELECT count(*) FROM {copy}").fetchone()[0]
        partitions = conn.execute(
            "SELECT count(*) FROM pg_partition_tree(%s::regclass) WHERE isleaf", (f"{copy}",)).fetchone()[0]
        conn.execute(f"ANALYZE {q(scratch)}.{q(retired)}")
        result.update({"plan_ran": True, "sample_rows": sample_rows, "rows_after": part_rows,
                       "rows_match": sample_rows == part_rows, "partitions": partitions})
        checks = []
        flat_total = part_total = 0.0
        for t in workload.templates:
            if table.qualified not in t.tables or not t.instances:
                continue
            # Generic plans cannot prune partitions at plan time: values drawn from pg_stats stand in for them.
            inst = next((i for i in t.instances + t.synthesized
                         if i.params is not None or i.source in ("sample", "literal")), t.instances[0])
            costs = []
            for relname in (retired, table.name):
                sql = _retarget(inst.sql, table, catalog, scratch, relname)
                if sql is not None and inst.params is not None:
                    sql = render_literal(sql, inst.params, inst.param_columns)
                costs.append(_explain_cost(conn, sql) if sql else None)
            flat, part = costs
            scanned = None
            if part is not None:
                scanned = len({r for r in part[1] if r.startswith(table.name[:50] + "_")})
            check = TemplateCheck(t.fingerprint, t.label, t.calls, flat[0] if flat else None,
                                  part[0] if part else None, scanned, partitions)
            checks.append(asdict(check))
            if flat and part:
                flat_total += t.calls * flat[0]
                part_total += t.calls * part[0]
        result["templates"] = checks
        result["cost_ratio"] = part_total / flat_total if flat_total > 0 else None
        if any(c["cost_flat"] is None for c in checks):
            result["note"] = ("templates without logged or synthesized values were not compared: generic plans "
                              "cannot prune partitions at plan time")
    except Exception as e:
        log.warning("validation of the plan for %s failed: %s", table.qualified, e)
        result.update({"plan_ran": False, "error": str(e).splitlines()[0]})
    finally:
        conn.execute(f"DROP SCHEMA IF EXISTS {q(scratch)} CASCADE")
    return result


# -- the advisor ------------------------------------------------------------------------------------------------

def advise_partitions(conn, workload: Workload, catalog: Catalog, settings, log_conn=None,
                      tables: list[str] | None = None, validate_plan: bool = True) -> list[PartitionAdvice]:
    """Advice for every table the workload touches (or the named ones), largest first."""
    if tables:
        chosen = [catalog.resolve(n) for n in tables]
        missing = [n for n, t in zip(tables, chosen) if t is None]
        if missing:
            raise ValueError(f"unknown table(s): {', '.join(missing)}")
    else:
        names = {n for t in workload.templates for n in t.tables}
        if workload.write_rows:
            names |= set(workload.write_rows)
        chosen = [catalog.tables[n] for n in names if n in catalog.tables]
        min_bytes = parse_bytes(settings.partition_min_table_bytes)
        chosen += [t for t in catalog.tables.values() if t.total_bytes >= min_bytes and t not in chosen]
    out = []
    for table in sorted(chosen, key=lambda t: -t.total_bytes):
        signals = collect_signals(table, workload, catalog, log_conn)
        advice = decide(table, signals, settings)
        if advice.decision == "partition":
            build_plan(conn, table, advice, ahead=settings.partition_ahead)
            if validate_plan:
                advice.validation = validate(conn, table, advice, workload, catalog,
                                             settings.partition_sample_percent, settings)
        out.append(advice)
    return out
