"""The query log store's schema and its daily partitions (shared by the proxy's writer, the learner and the advisors)."""
from __future__ import annotations

import datetime as dt
from importlib import resources

SCHEMA_SQL = resources.files("proxy").joinpath("logstore_schema.sql").read_text()


def partition_name(day: dt.date) -> str:
    return f"query_events_{day:%Y%m%d}"


def partition_ddl(day: dt.date) -> str:
    nxt = day + dt.timedelta(days=1)
    return (f"CREATE TABLE IF NOT EXISTS pgpilot.{partition_name(day)} PARTITION OF pgpilot.query_events "
            f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') TO ('{nxt.isoformat()} 00:00:00+00')")


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
