"""What every collector shares: connections to monitored databases, the snapshot schema, notices and row writing."""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable, Sequence

import psycopg
from psycopg.types.json import Jsonb

log = logging.getLogger("pgpilot.collectors")

SCHEMA_SQL = resources.files("learning.collectors").joinpath("schema.sql").read_text()

# A collector must never hang the learner nor queue behind an application's locks for long.
STATEMENT_TIMEOUT_MS = 60_000
LOCK_TIMEOUT_MS = 2_000
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
APPLICATION_NAME = "pgpilot-collector"


def connect(dsn: str) -> psycopg.Connection:
    """An autocommit connection with timeouts, never preparing statements server-side on its own."""
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME,
                           prepare_threshold=None)
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    return conn


def ensure_schema(store: psycopg.Connection) -> None:
    store.execute(SCHEMA_SQL)


@dataclass
class Target:
    """A monitored database: the name it is recorded under and an open connection to it."""

    name: str
    conn: psycopg.Connection

    @property
    def server(self) -> str:
        return f"{self.conn.info.host}:{self.conn.info.port}"

    @property
    def is_local(self) -> bool:
        """True when the server runs on this machine (loopback address or unix socket)."""
        host = self.conn.info.host or ""
        return host in LOCAL_HOSTS or host.startswith("/") or host == ""

    def now(self) -> dt.datetime:
        """The monitored server's clock: every row of one snapshot carries this timestamp."""
        return self.conn.execute("SELECT clock_timestamp()").fetchone()[0]


@dataclass
class CollectorResult:
    """What one collector did for one target: rows written per table and notices for the operator."""

    rows: dict[str, int] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def notice(self, message: str) -> None:
        log.warning("%s", message)
        self.notices.append(message)

    def wrote(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def write_rows(store: psycopg.Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """COPY rows into pgpilot.<table>; dicts become jsonb. Returns the number of rows written."""
    count = 0
    cols = ", ".join(columns)
    with store.cursor() as cur, cur.copy(f"COPY pgpilot.{table} ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([Jsonb(v) if isinstance(v, dict) else v for v in row])
            count += 1
    return count


def error_text(exc: BaseException) -> str:
    """The server's primary message for a database error, else the exception's text, on one line."""
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None else None) or str(exc)
    return " ".join(message.split())


def ratio(hit: int | None, read: int | None) -> float | None:
    """hit / (hit + read), or None when nothing was read at all."""
    if hit is None or read is None or hit + read == 0:
        return None
    return hit / (hit + read)
