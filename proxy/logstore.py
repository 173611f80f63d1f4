"""The query log store's schema and its daily partitions (shared by the proxy's writer, the learner and the advisors)."""
from __future__ import annotations

import datetime as dt
from importlib import resources

SCHEMA_SQL = resources.files("proxy").joinpath("logstore_schema.sql").read_text()

# The partitioned tables behind the pgpilot.query_events view; the proxy's writer COPYs into the first.
PARTITIONED = ("query_event_groups", "query_event_rows")


def partition_name(day: dt.date, table: str = "query_event_groups") -> str:
    return f"{table}_{day:%Y%m%d}"


def partition_ddl(day: dt.date) -> str:
    """One day's partitions of every table behind query_events (one string, several statements)."""
    nxt = day + dt.timedelta(days=1)
    return ";\n".join(
        f"CREATE TABLE IF NOT EXISTS pgpilot.{partition_name(day, table)} PARTITION OF pgpilot.{table} "
        f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') TO ('{nxt.isoformat()} 00:00:00+00')"
        for table in PARTITIONED)


async def ensure_schema(conn, days: range = range(-1, 3)) -> None:
    """Create the schema and partitions around today (asyncpg connection)."""
    await conn.execute(SCHEMA_SQL)
    today = dt.datetime.now(dt.timezone.utc).date()
    for d in days:
        await conn.execute(partition_ddl(today + dt.timedelta(days=d)))


def ensure_schema_sync(conn, days: range = range(-1, 3), extra_days: list[dt.date] | None = None) -> None:
    """The same for a psycopg (3) connection, for offline tools and tests; extra_days adds older partitions."""
    conn.execute(SCHEMA_SQL)
    today = dt.datetime.now(dt.timezone.utc).date()
    wanted = {today + dt.timedelta(days=d) for d in days} | set(extra_days or [])
    for day in sorted(wanted):
        conn.execute(partition_ddl(day))
