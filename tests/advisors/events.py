"""A synthetic event-log schema for the advisors' tests: a time-ordered events table and a small lookup table.

`create_events(conn, rows)` fills `events` with `rows` rows spread over two years up to today (inserted in
time order, as an append-only log would be) across 50 tenants, and `event_kinds` with 8 rows.
`event_workload(rng)` yields the statements an application on it would send: month-range reports,
per-tenant timelines, kind lookups and a monthly retention DELETE.
"""
from __future__ import annotations

import datetime as dt
import random
from typing import Iterator

from bench.workloads.recorder import Statement

KINDS = ("click", "view", "purchase", "signup", "login", "logout", "refund", "share")


def create_events(conn, rows: int = 300_000) -> None:
    conn.execute("""
        CREATE TABLE events (
            id        bigserial PRIMARY KEY,
            tenant_id integer     NOT NULL,
            ts        timestamptz NOT NULL,
            kind      text        NOT NULL,
            amount    numeric(12, 2),
            payload   text
        )""")
    conn.execute("""
        INSERT INTO events (tenant_id, ts, kind, amount, payload)
        SELECT 1 + (hashint4(i) & 2147483647) %% 50,
               date_trunc('day', now()) - interval '730 days' + (i::float / %(rows)s) * interval '730 days',
               (ARRAY['click','view','purchase','signup','login','logout','refund','share'])[1 + i %% 8],
               (i %% 1000) / 10.0,
               md5(i::text)
        FROM generate_series(1, %(rows)s) i""", {"rows": rows})
    conn.execute("CREATE TABLE event_kinds (kind text PRIMARY KEY, description text NOT NULL)")
    conn.execute("INSERT INTO event_kinds SELECT k, 'the ' || k || ' event' FROM unnest(%s::text[]) k",
                 (list(KINDS),))
    conn.execute("VACUUM ANALYZE events")
    conn.execute("VACUUM ANALYZE event_kinds")


def _month_start(today: dt.date, months_back: int) -> dt.date:
    m = today.year * 12 + today.month - 1 - months_back
    return dt.date(m // 12, m % 12 + 1, 1)


def event_workload(rng: random.Random, reports: int = 40, timelines: int = 40, lookups: int = 30,
                   retention_deletes: int = 2) -> Iterator[Statement]:
    today = dt.date.today()
    oldest = today - dt.timedelta(days=730)
    for _ in range(reports):
        back = rng.randint(1, 23)
        start, end = _month_start(today, back), _month_start(today, back - 1)
        yield Statement(f"SELECT kind, count(*), sum(amount) FROM events "
                        f"WHERE ts >= '{start}' AND ts < '{end}' GROUP BY kind")
    for _ in range(timelines):
        start = _month_start(today, rng.randint(1, 23))
        yield Statement(f"SELECT id, ts, kind, amount FROM events WHERE tenant_id = {rng.randint(1, 50)} "
                        f"AND ts >= '{start}' AND ts < '{start + dt.timedelta(days=31)}' ORDER BY ts LIMIT 100")
    for _ in range(lookups):
        yield Statement(f"SELECT description FROM event_kinds WHERE kind = '{rng.choice(KINDS)}'")
    for i in range(retention_deletes):
        yield Statement(f"DELETE FROM events WHERE ts < '{oldest + dt.timedelta(days=i + 1)}'")
