"""Writes that bypass the proxy, read from the upstream's WAL through a temporary logical replication slot with
the built-in test_decoding plugin.

Each committed transaction arrives as the tables it changed (INSERT/UPDATE/DELETE/TRUNCATE lines, including
those written by triggers, cascades and partition routing) and its commit time; the delay from commit to the
moment the bump is recorded is measured. test_decoding prints no DDL, but a transaction that changed only
catalogs still shows as an empty BEGIN/COMMIT pair: that is the hint to check the catalog signature now.

Two readers of the slot:
- `StreamingFeed` (default): the replication protocol (START_REPLICATION over a `replication=database`
  connection, psycopg2's asynchronous replication support driven by the event loop). Postgres decodes each
  WAL record once and pushes transactions as they commit.
- `PollingFeed`: `pg_logical_slot_get_changes` every `decode_interval` over an ordinary connection, with rows
  grouped per transaction on the server. Each call decodes again from the slot's restart_lsn, which trails by
  up to ~15 s of WAL (running-xacts records) or to the start of the oldest open write transaction: about 7x the
  delay and 10x the decoding CPU of streaming under a light write load (bench.cache_decoding). For upstreams
  that refuse replication connections.
A temporary slot belongs to its session: Postgres drops it when that session ends, and also on any error in
it, so nothing but reading the slot ever runs on that connection. Losing the slot means changes may have been
missed: the owner flushes and a new slot is created. Every proxy runs its own feed; two proxies bumping the
same write is harmless.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import deque
from datetime import datetime
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
    """Delay from a transaction's commit to its invalidation being recorded, in seconds (per batch read)."""

    def __init__(self, keep: int = 1024):
        self.last = 0.0
        self.max = 0.0
        self.sum = 0.0
        self.count = 0
        self.recent: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float) -> None:
        self.last = seconds
        self.max = max(self.max, seconds)
        self.sum += seconds
        self.count += 1
        self.recent.append(seconds)

    def quantile(self, q: float) -> float:
        if not self.recent:
            return 0.0
        values = sorted(self.recent)
        return values[min(len(values) - 1, int(q * len(values)))]

    def as_dict(self) -> dict:
        return {"last_seconds": round(self.last, 6), "max_seconds": round(self.max, 6),
                "mean_seconds": round(self.sum / self.count, 6) if self.count else 0.0,
                "p50_seconds": round(self.quantile(0.5), 6), "p99_seconds": round(self.quantile(0.99), 6),
                "batches": self.count}


class ChangeFeed:
    """One upstream database's slot and the loop that turns its transactions into invalidations; a reader
    subclass opens the slot (`_open`), reads it (`_consume`) and closes it (`_close`)."""

    def __init__(self, database: str, dsn: str, on_changes: Callable[[list[DecodedTransaction]], Awaitable[None]],
                 on_live: Callable[[], Awaitable[None]], on_lost: Callable[[str], None],
                 connect_timeout: float = 5.0):
        self.database = database
        self.dsn = dsn
        self.on_changes = on_changes
        self.on_live = on_live
        self.on_lost = on_lost
        self.connect_timeout = connect_timeout
        self.slot: str | None = None
        self.live = False
        self.lag = LagStats()
        self.reads = 0
        self.slots_created = 0
        self.last_error = ""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"cache-decoding-{self.database}")

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                await self._open()
                backoff = 0.5
                await self.on_live()
                self.live = True
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - connection and server errors end the slot; so would a bug
                self.last_error = f"{type(e).__name__}: {e}".strip()
                if not _expected(e):
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

    def _new_slot_name(self) -> str:
        return "pgpilot_" + secrets.token_hex(6)

    async def _deliver(self, txns: list[DecodedTransaction], received: float, server_now: float) -> None:
        """Invalidate for these transactions; the oldest commit's delay (commit to recorded) is the batch's."""
        await self.on_changes(txns)
        oldest = min(t.commit_ts for t in txns)
        self.lag.record(max(0.0, server_now - oldest) + (time.monotonic() - received))

    async def stop(self, timeout: float = 5.0) -> None:
        """End reading, drop the slot, close; bounded by `timeout` even if a read or slot creation hangs."""
        self._stopping.set()
        self._wake()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout / 2)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            pass
        if not task.done():
            # Stuck reading or waiting for a consistent point: ending the session ends the slot with it.
            self._abort()
            task.cancel()
            try:
                await asyncio.wait_for(task, timeout / 2)
            except BaseException:  # noqa: BLE001 - shutting down
                pass
        self.live = False

    def stats(self) -> dict:
        return {"reader": self.reader, "live": self.live, "slot": self.slot, "reads": self.reads,
                "slots_created": self.slots_created, "last_error": self.last_error, "lag": self.lag.as_dict()}

    reader = ""

    async def _open(self) -> None:
        raise NotImplementedError

    async def _consume(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        """Interrupt a wait in _consume (stop() was called)."""


def _expected(e: BaseException) -> bool:
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    module = type(e).__module__ or ""
    return module.startswith(("asyncpg", "psycopg2"))


class PollingFeed(ChangeFeed):
    """pg_logical_slot_get_changes every `interval` seconds over an ordinary connection (asyncpg)."""

    reader = "poll"

    def __init__(self, *args, interval: float = 0.01, batch: int = 100_000, **kwargs):
        super().__init__(*args, **kwargs)
        self.interval = interval
        self.batch = batch
        self._conn = None

    async def _open(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout, statement_cache_size=0,
                                           server_settings={"application_name": "pgpilot-cache-decoding",
                                                            "TimeZone": "UTC", "DateStyle": "ISO",
                                                            "statement_timeout": "0"})
        name = self._new_slot_name()
        # Waits for transactions running now to end (the slot's consistent point); stop() may interrupt it.
        await self._conn.execute(
            "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'test_decoding', temporary => true)", name)
        self.slot = name
        self.slots_created += 1

    async def _consume(self) -> None:
        conn = self._conn
        while not self._stopping.is_set():
            rows = await conn.fetch(POLL_SQL, self.slot, self.batch)
            received = time.monotonic()
            self.reads += 1
            changes = 0
            txns: list[DecodedTransaction] = []
            for _, rels, commit_ts, count, _now in rows:
                changes += count
                if commit_ts is not None:   # get_changes returns whole transactions, COMMIT line included
                    txns.append(DecodedTransaction([parse_qualified(r) for r in rels or ()], float(commit_ts)))
            if txns:
                await self._deliver(txns, received, float(rows[0][4]))
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

    def _abort(self) -> None:
        if self._conn is not None:
            self._conn.terminate()


class StreamingFeed(ChangeFeed):
    """START_REPLICATION over a replication connection: transactions pushed as they commit (psycopg2)."""

    reader = "stream"
    _DRAIN_MAX = 5000          # messages handled per event-loop callback, so a bulk load does not stall the loop
    _FEEDBACK_EVERY = 5.0      # seconds between status updates (wal_sender_timeout is 60 s by default)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._conn = None
        self._cur = None
        self._ready: list[tuple[DecodedTransaction, float, float]] = []   # (txn, received, server send time)
        self._tables: set[bytes] = set()
        self._lsn = 0
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None
        self._reading = False

    async def _wait(self, conn) -> None:
        """Drive one asynchronous psycopg2 operation to its end on the event loop."""
        import psycopg2.extensions as ext

        loop = asyncio.get_running_loop()
        while True:
            state = conn.poll()
            if state == ext.POLL_OK:
                return
            fut = loop.create_future()
            fd = conn.fileno()

            def ready() -> None:
                if not fut.done():
                    fut.set_result(None)
            if state == ext.POLL_READ:
                loop.add_reader(fd, ready)
                try:
                    await fut
                finally:
                    loop.remove_reader(fd)
            else:
                loop.add_writer(fd, ready)
                try:
                    await fut
                finally:
                    loop.remove_writer(fd)

    async def _open(self) -> None:
        import psycopg2
        import psycopg2.extras

        conn = psycopg2.connect(self.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                                async_=1, application_name="pgpilot-cache-decoding", options="-c TimeZone=UTC")
        self._conn = conn
        await asyncio.wait_for(self._wait(conn), self.connect_timeout)
        cur = conn.cursor()
        self._cur = cur
        name = self._new_slot_name()
        # Waits for transactions running now to end (the slot's consistent point); stop() may interrupt it.
        cur.execute(f"CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL test_decoding")
        await self._wait(conn)
        cur.fetchall()
        self.slot = name
        self.slots_created += 1
        cur.start_replication(slot_name=name, decode=False,
                              options={"include-xids": "0", "include-timestamp": "1", "skip-empty-xacts": "0"})
        await self._wait(conn)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self._conn.fileno()
        loop.add_reader(fd, self._drain)
        self._reading = True
        last_feedback = time.monotonic()
        acked = 0
        try:
            self._drain()
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._FEEDBACK_EVERY)
                except asyncio.TimeoutError:
                    pass
                self._wakeup.clear()
                if self._error is not None:
                    raise self._error
                if self._ready:
                    batch, self._ready = self._ready, []
                    self.reads += 1
                    txns = [t for t, _, _ in batch]
                    # The oldest commit: the server's clock when it sent it, our clock when it arrived.
                    received = min(r for _, r, _ in batch)
                    server_sent = min(s for _, _, s in batch)
                    await self._deliver(txns, received, server_sent)
                if self._lsn != acked or time.monotonic() - last_feedback >= self._FEEDBACK_EVERY:
                    # Changes up to here are recorded: the server may recycle that WAL.
                    self._cur.send_feedback(flush_lsn=self._lsn)
                    acked = self._lsn
                    last_feedback = time.monotonic()
        finally:
            self._reading = False
            try:
                loop.remove_reader(fd)
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass

    def _drain(self) -> None:
        """Read what psycopg2 has buffered (called when the socket is readable, and again while there is more)."""
        if not self._reading:
            return
        cur = self._cur
        got = False
        try:
            for _ in range(self._DRAIN_MAX):
                msg = cur.read_message()
                if msg is None:
                    break
                p = msg.payload
                if p[:6] == b"table ":
                    self._tables.add(p[6:p.find(b": ", 6)])
                elif p[:11] == b"COMMIT (at ":
                    commit = datetime.fromisoformat(p[11:].rstrip(b")").decode()).timestamp()
                    names = [parse_qualified(n.decode("utf-8", "replace")) for n in self._tables]
                    self._ready.append((DecodedTransaction(names, commit), time.monotonic(),
                                        msg.send_time.timestamp()))
                    self._tables = set()
                    self._lsn = msg.data_start
                    got = True
                elif p[:5] == b"BEGIN":
                    self._tables = set()
            else:
                asyncio.get_running_loop().call_soon(self._drain)   # more may be buffered: finish later
        except Exception as e:  # noqa: BLE001 - psycopg2.Error, a lost connection: the consumer raises it
            self._error = e
            got = True
        if got:
            self._wakeup.set()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        slot, self.slot = self.slot, None
        self._cur = None
        self._ready = []
        self._tables = set()
        self._lsn = 0
        self._error = None
        if conn is None:
            return
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
        if slot is not None:
            await self._wait_slot_gone(slot)

    async def _wait_slot_gone(self, slot: str, timeout: float = 3.0) -> None:
        """The walsender ends (and drops the slot) once it sees the connection closed: wait for that."""
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn, timeout=timeout, statement_cache_size=0,
                                         server_settings={"application_name": "pgpilot-cache-decoding-close"})
        except Exception:  # noqa: BLE001 - the upstream may be down, and the slot with it
            return
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pid = await conn.fetchval("SELECT coalesce(active_pid, 0) FROM pg_catalog.pg_replication_slots"
                                          " WHERE slot_name = $1", slot)
                if pid is None:
                    return
                if time.monotonic() + 0.5 > deadline and pid:
                    await conn.execute("SELECT pg_catalog.pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.02)
        except Exception:  # noqa: BLE001
            pass
        finally:
            await conn.close()

    def _abort(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _wake(self) -> None:
        self._wakeup.set()
