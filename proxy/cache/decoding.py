"""Writes that bypass the proxy, read from the upstream's WAL: a temporary logical replication slot with the
built-in test_decoding plugin, polled with pg_logical_slot_get_changes every few milliseconds.

Each committed transaction arrives as the tables it changed (INSERT/UPDATE/DELETE/TRUNCATE lines, including
those written by triggers, cascades and partition routing) and its commit time; the delay from commit to the
moment the bump is recorded is measured. test_decoding prints no DDL, but a transaction that changed only
catalogs still shows as an empty BEGIN/COMMIT pair: that is the hint to check the catalog signature now.

A temporary slot belongs to its connection: Postgres drops it when that session ends, and also on any error
in it, so nothing but the poll ever runs on this connection and no statement is ever cancelled. Losing the
slot (an error, a dropped connection) means changes may have been missed: the owner flushes and a new slot is
created. Every proxy runs its own feed; two proxies bumping the same write is harmless.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Awaitable, Callable

log = logging.getLogger("pgpilot.cache")

# Rows are grouped per transaction on the server, so a bulk load sends one row per (transaction, table).
POLL_SQL = """
WITH c AS (
  SELECT xid::text AS xid, data FROM pg_catalog.pg_logical_slot_get_changes($1, NULL, $2,
      'include-xids', '0', 'include-timestamp', '1', 'skip-empty-xacts', '0')
)
SELECT xid,
       array_agg(DISTINCT substr(split_part(data, ': ', 1), 7)) FILTER (WHERE left(data, 6) = 'table ') AS rels,
       max(CASE WHEN left(data, 11) = 'COMMIT (at ' THEN extract(epoch FROM rtrim(substr(data, 12), ')')::timestamptz) END),
       count(*),
       extract(epoch FROM clock_timestamp())
FROM c GROUP BY xid"""

_IDENT = r'(?:"(?:[^"]|"")*"|[^".\s]+)'
_QUALIFIED = re.compile(rf"({_IDENT})\.({_IDENT})\Z")


def parse_qualified(text: str) -> tuple[str, str] | None:
    """test_decoding's schema.table (quote_identifier rules) as raw names; None if it does not parse."""
    m = _QUALIFIED.match(text)
    if m is None:
        return None

    def unq(s: str) -> str:
        return s[1:-1].replace('""', '"') if s.startswith('"') else s
    return unq(m.group(1)), unq(m.group(2))


class DecodedTransaction:
    __slots__ = ("tables", "commit_ts", "catalog_only")

    def __init__(self, tables: list[tuple[str, str] | None], commit_ts: float | None):
        self.tables = tables           # (schema, table), or None for a name that did not parse
        self.commit_ts = commit_ts     # Postgres clock, seconds since the epoch
        self.catalog_only = not tables


class LagStats:
    """Delay from a transaction's commit to its invalidation being recorded, in seconds."""

    def __init__(self):
        self.last = 0.0
        self.max = 0.0
        self.sum = 0.0
        self.count = 0

    def record(self, seconds: float) -> None:
        self.last = seconds
        self.max = max(self.max, seconds)
        self.sum += seconds
        self.count += 1

    def as_dict(self) -> dict:
        return {"last_seconds": round(self.last, 6), "max_seconds": round(self.max, 6),
                "mean_seconds": round(self.sum / self.count, 6) if self.count else 0.0,
                "transactions": self.count}


class ChangeFeed:
    """One upstream database's slot, its polling loop and the callbacks that turn changes into invalidations."""

    def __init__(self, database: str, dsn: str, interval: float, batch: int,
                 on_changes: Callable[[list[DecodedTransaction]], Awaitable[None]],
                 on_live: Callable[[], Awaitable[None]], on_lost: Callable[[str], None],
                 connect_timeout: float = 5.0):
        self.database = database
        self.dsn = dsn
        self.interval = interval
        self.batch = batch
        self.on_changes = on_changes
        self.on_live = on_live
        self.on_lost = on_lost
        self.connect_timeout = connect_timeout
        self.slot: str | None = None
        self.live = False
        self.lag = LagStats()
        self.polls = 0
        self.slots_created = 0
        self.last_error = ""
        self._conn = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._busy = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"cache-decoding-{self.database}")

    async def _run(self) -> None:
        import asyncpg

        backoff = 0.5
        while not self._stopping.is_set():
            try:
                await self._open()
                backoff = 0.5
                await self.on_live()
                self.live = True
                await self._poll_loop()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                self.last_error = str(e) or type(e).__name__
            except Exception as e:  # noqa: BLE001 - a bug here must not end invalidation silently
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("cache: change feed of %s failed", self.database)
            if (self.live or self.slot is not None) and not self._stopping.is_set():
                self.live = False
                self.on_lost(self.last_error)
            await self._close()
            if self._stopping.is_set():
                return
            log.warning("cache: change feed of %s interrupted (%s); new slot in %.1fs",
                        self.database, self.last_error, backoff)
            try:
                await asyncio.wait_for(self._stopping.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 10.0)

    async def _open(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout, statement_cache_size=0,
                                           server_settings={"application_name": "pgpilot-cache-decoding",
                                                            "TimeZone": "UTC", "DateStyle": "ISO",
                                                            "statement_timeout": "0"})
        name = "pgpilot_" + secrets.token_hex(6)
        # Waits for transactions running now to end (the slot's consistent point); stop() may interrupt it.
        self._busy = True
        try:
            await self._conn.execute(
                "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'test_decoding', temporary => true)", name)
        finally:
            self._busy = False
        self.slot = name
        self.slots_created += 1

    async def _poll_loop(self) -> None:
        conn = self._conn
        while not self._stopping.is_set():
            self._busy = True
            try:
                rows = await conn.fetch(POLL_SQL, self.slot, self.batch)
            finally:
                self._busy = False
            fetched = time.monotonic()
            self.polls += 1
            if rows:
                txns: list[DecodedTransaction] = []
                changes = 0
                now_pg = rows[0][4]
                for _, rels, commit_ts, count, _now in rows:
                    changes += count
                    if commit_ts is None:
                        continue   # no COMMIT line: cannot happen for get_changes, which returns whole transactions
                    txns.append(DecodedTransaction([parse_qualified(r) for r in rels or ()], float(commit_ts)))
                if txns:
                    await self.on_changes(txns)
                    recorded = time.monotonic() - fetched
                    # The oldest commit of the batch waited longest: its delay is the batch's.
                    oldest = min(t.commit_ts for t in txns)
                    self.lag.record(max(0.0, float(now_pg) - oldest) + recorded)
                if changes >= self.batch:
                    continue    # more is waiting
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        slot, self.slot = self.slot, None
        if conn is None:
            return
        try:
            if slot is not None and not conn.is_closed():
                await asyncio.wait_for(conn.execute("SELECT pg_catalog.pg_drop_replication_slot($1)", slot), 2.0)
        except Exception:  # noqa: BLE001 - the slot is temporary: it goes with the session anyway
            pass
        try:
            await asyncio.wait_for(conn.close(), 2.0)
        except Exception:  # noqa: BLE001
            conn.terminate()

    async def stop(self, timeout: float = 5.0) -> None:
        """End polling, drop the slot, close; bounded by `timeout` even if a poll or slot creation hangs."""
        self._stopping.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout / 2)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            pass
        if not task.done():
            # Stuck in a poll or waiting for a consistent point: ending the session ends the slot with it.
            conn = self._conn
            if conn is not None:
                conn.terminate()
            task.cancel()
            try:
                await asyncio.wait_for(task, timeout / 2)
            except BaseException:  # noqa: BLE001 - shutting down
                pass
        self.live = False

    def stats(self) -> dict:
        return {"live": self.live, "slot": self.slot, "polls": self.polls, "slots_created": self.slots_created,
                "last_error": self.last_error, "lag": self.lag.as_dict()}
