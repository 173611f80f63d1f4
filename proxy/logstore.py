"""The query log store's schema and its daily partitions (shared by the proxy's writer, the learner and the advisors)."""
from __future__ import annotations

import datetime as dt
from importlib import resources

import pglast

SCHEMA_SQL = resources.files("proxy").joinpath("logstore_schema.sql").read_text()
# Run one at a time, each in its own transaction: a statement's locks are released before the next one asks for
# its own. Run as one multi-statement Query (one implicit transaction), the set-up held an ACCESS EXCLUSIVE lock on
# query_event_groups while it waited for one on the query_events view, and a reader of the view, locking the view
# first and then the tables behind it, deadlocked with it.
SCHEMA_STATEMENTS = tuple(pglast.split(SCHEMA_SQL))

# The partitioned tables behind the pgpilot.query_events view; the proxy's writer COPYs into the first.
PARTITIONED = ("query_event_groups", "query_event_rows")


def partition_name(day: dt.date, table: str = "query_event_groups") -> str:
    return f"{table}_{day:%Y%m%d}"


def partition_ddl(day: dt.date) -> tuple[str, ...]:
    """One day's partitions of every table behind query_events: one statement per table, to be run one at a time
    (see SCHEMA_STATEMENTS)."""
    nxt = day + dt.timedelta(days=1)
    return tuple(
        f"CREATE TABLE IF NOT EXISTS pgpilot.{partition_name(day, table)} PARTITION OF pgpilot.{table} "
        f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') TO ('{nxt.isoformat()} 00:00:00+00')"
        for table in PARTITIONED)


def schema_statements(days: range = range(-1, 3), extra_days: list[dt.date] | None = None) -> list[str]:
    """The schema, then the partitions of the days around today (and of extra_days), one statement each."""
    today = dt.datetime.now(dt.timezone.utc).date()
    wanted = {today + dt.timedelta(days=d) for d in days} | set(extra_days or [])
    return [*SCHEMA_STATEMENTS, *(statement for day in sorted(wanted) for statement in partition_ddl(day))]


async def ensure_schema(conn, days: range = range(-1, 3)) -> None:
    """Create the schema and partitions around today (asyncpg connection, outside a transaction: each statement
    commits on its own)."""
    for statement in schema_statements(days):
        await conn.execute(statement)


def ensure_schema_sync(conn, days: range = range(-1, 3), extra_days: list[dt.date] | None = None) -> None:
    """The same for a psycopg (3) connection, for offline tools and tests; extra_days adds older partitions. Each
    statement commits on its own on an autocommit connection; otherwise the caller's transaction holds them all."""
    for statement in schema_statements(days, extra_days):
        conn.execute(statement)
