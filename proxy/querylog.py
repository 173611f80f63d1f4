"""Query events: what the proxy records for every statement, and the writer that ships them to the log store.

Contract with the session
-------------------------
* For every statement the session builds a `QueryEvent` with raw facts only (SQL text, timings, counts) and
  calls `QueryLog.submit(event)` from the event loop's thread. `submit` is O(1): it appends to a bounded
  queue and never blocks, awaits or raises. Everything costly (fingerprint, normalization, statement kind,
  tables; see proxy/analysis.py) happens later in the background writer, cached per text.
* A simple-protocol Query message may carry several statements. The session sends one event per
  CommandComplete/ErrorResponse with `sql` = the whole text and `stmt_index` = which statement of the text
  (0-based) completed; the writer logs that statement only, with the event's timings and counts as they are.
* An event whose text holds several statements but has `stmt_index=None` is split into one row per statement:
  `duration_us` and `bytes_out` are shared out evenly (their sums are kept), `wait_us` goes to the first
  statement, `rows` and `sqlstate` to the last one (an error ends a simple Query). This is approximate;
  sessions that know the boundaries send `stmt_index`.
* `parameters`: bound parameter values (text) of an extended-protocol Execute. They are stored only with
  `query_log.parameters` on; with it on, simple-protocol events get their literal values extracted instead.
  With it off no literal ever reaches the store: statements are stored as fingerprint + normalized text.

The writer
----------
A background task takes the queue in batches (`batch_size`, or whatever is there every `flush_interval`),
analyses them, feeds the in-memory `QueryStats` (for SHOW QUERIES), and hands the rows to a second task that
owns one asyncpg connection to the store: it upserts new templates and COPYs the rows into
pgpilot.query_events in one transaction, keeps tomorrow's partition created and drops partitions older than
`retention_days`. When the store is slow or away, batches spill to a bounded spool on local disk and are
replayed (at least once) after reconnecting with backoff. When the queue or the spool is full, events are
dropped, counted exactly in `dropped`, and reported by a rate-limited log line.

Counters (plain ints, also in `stats()`): `submitted` counts events; `written`, `spooled`, `replayed` and
`dropped` count log rows (one per event, except split multi-statement events). `written` includes
`replayed`. After a flush, submitted == written + dropped + (spooled - replayed) for single-statement events
of one writer alone on its spool directory; `replayed` also counts rows that an earlier process (a proxy
before its restart) spooled in the same directory.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import heapq
import io
import ipaddress
import json
import logging
import os
import random
import re
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

from proxy import logstore
from proxy.analysis import Analyzer, StatementInfo, extract_literals

log = logging.getLogger("pgpilot.querylog")


class QueryEvent:
    __slots__ = (
        "ts", "duration_us", "wait_us", "sql", "rows", "bytes_out", "sqlstate",
        "database", "username", "application_name", "client_addr", "backend_pid",
        "xact_id", "in_transaction", "protocol", "cache_outcome", "rewrite", "anomaly_score",
        "parameters", "stmt_index",
    )

    def __init__(self, ts: float, duration_us: int, wait_us: int, sql: str, rows: int | None,
                 bytes_out: int, sqlstate: str | None, database: str, username: str,
                 application_name: str, client_addr: str | None, backend_pid: int | None,
                 xact_id: int, in_transaction: bool, protocol: str, cache_outcome: str | None = None,
                 rewrite: str | None = None, anomaly_score: float | None = None,
                 parameters: list | None = None, stmt_index: int | None = None):
        self.ts = ts                      # time.time() at statement start
        self.duration_us = duration_us
        self.wait_us = wait_us
        self.sql = sql                    # the statement text as sent by the client
        self.rows = rows
        self.bytes_out = bytes_out
        self.sqlstate = sqlstate
        self.database = database
        self.username = username
        self.application_name = application_name
        self.client_addr = client_addr
        self.backend_pid = backend_pid
        self.xact_id = xact_id
        self.in_transaction = in_transaction
        self.protocol = protocol          # "simple" | "extended"
        self.cache_outcome = cache_outcome
        self.rewrite = rewrite
        self.anomaly_score = anomaly_score
        self.parameters = parameters      # bound parameter values (text) when query_log.parameters is on
        self.stmt_index = stmt_index      # which statement of a multi-statement text this event is about


COLUMNS = ("ts", "duration_us", "wait_us", "fingerprint", "kind", "tables_read", "tables_written", "rows",
           "bytes_out", "sqlstate", "database", "username", "application_name", "client_addr", "backend_pid",
           "xact_id", "in_transaction", "protocol", "cache_outcome", "rewrite", "anomaly_score", "proxy_id",
           "parameters")
_FP = COLUMNS.index("fingerprint")

_UPSERT_TEMPLATE = """
INSERT INTO pgpilot.templates AS t
    (fingerprint, normalized_sql, kind, tables_read, tables_written, first_seen, last_seen, sample_sql)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (fingerprint) DO UPDATE SET
    first_seen = least(t.first_seen, excluded.first_seen),
    last_seen = greatest(t.last_seen, excluded.last_seen),
    sample_sql = coalesce(t.sample_sql, excluded.sample_sql)
"""
_REFRESH_LAST_SEEN = """
UPDATE pgpilot.templates AS t SET last_seen = v.ts
FROM unnest($1::text[], $2::timestamptz[]) AS v(fp, ts)
WHERE t.fingerprint = v.fp AND t.last_seen < v.ts
"""
_PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'pgpilot.query_events'::regclass
"""
_PARTITION_NAME = re.compile(r"^query_events_(\d{8})$")

_DAY = 86400
_EPOCH = dt.date(1970, 1, 1)
_UTC = dt.timezone.utc
_ANALYSE_SLICE = 0.001        # seconds of analysis between two yields to the event loop
_SPOOL_LINE_ROWS = 200        # rows per spool line (one JSON document)
_COPY_ROWS = 1000             # rows per COPY statement (a batch may take several, in one transaction)
_OUTBOX_BATCHES = 4           # analysed batches that may wait for the store before spilling to the spool
_MAINTENANCE_EVERY = 600.0    # seconds between partition checks (also done on every connect)
_DROP_LOG_EVERY = 10.0        # seconds between two "dropped" log lines
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57", "58")


def _day_of(ts: float) -> int:
    return int(ts // _DAY)


def _date_of_day(day: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=day)


def _today() -> int:
    return _day_of(time.time())


def _redacted(dsn: str) -> str:
    try:
        u = urlparse(dsn)
        return f"{u.hostname}:{u.port or 5432}{u.path or ''}"
    except ValueError:
        return "(unparseable dsn)"


class _Batch:
    """Analysed rows ready for the store, with the templates among them that the store may not know yet."""

    __slots__ = ("rows", "templates", "events")

    def __init__(self, rows: list[tuple], templates: dict[str, list], events: int):
        self.rows = rows                # tuples in COLUMNS order, ts as epoch seconds
        # fingerprint -> [normalized_sql, kind, tables_read, tables_written, sample_sql, first_seen, last_seen]
        self.templates = templates
        self.events = events            # submitted events this batch settles (0 for spool replays)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class CopyTextEncoder:
    """Rows as COPY text format, with the repeating parts (names, table lists, the second of ts) cached.

    Cheaper in CPU than asyncpg's binary COPY of the same records, which parses every inet value again and
    checks every array's type (bench.querylog_submit measures the writer against that reference).
    """

    def __init__(self):
        self._text: dict[str, str] = {}
        self._arrays: dict[tuple, str] = {}
        self._seconds: dict[int, str] = {}

    def encode(self, rows: list[tuple]) -> bytes:
        text, array, second = self._text_field, self._array_field, self._seconds
        lines = []
        for (ts, duration, wait, fp, kind, read, written, nrows, nbytes, sqlstate, database, username, app, addr,
             pid, xact, in_xact, protocol, cache_outcome, rewrite, score, proxy_id, params) in rows:
            whole = int(ts)
            prefix = second.get(whole)
            if prefix is None:
                if len(second) > 4096:
                    second.clear()
                prefix = second[whole] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
            lines.append("\t".join((
                f"{prefix}.{int((ts - whole) * 1e6):06d}+00", str(duration), str(wait), text(fp), text(kind),
                array(read), array(written), "\\N" if nrows is None else str(nrows), str(nbytes),
                "\\N" if sqlstate is None else text(sqlstate), text(database), text(username), text(app),
                "\\N" if addr is None else text(addr), "\\N" if pid is None else str(pid),
                "\\N" if xact is None else str(xact), "\\N" if in_xact is None else ("t" if in_xact else "f"),
                text(protocol), text(cache_outcome), text(rewrite), "\\N" if score is None else repr(score),
                text(proxy_id), "\\N" if params is None else _array_literal(params).translate(_COPY_ESCAPES))))
        lines.append("")
        return "\n".join(lines).encode("utf-8", "replace")

    def _text_field(self, value) -> str:
        if value is None:
            return "\\N"
        escaped = self._text.get(value)
        if escaped is None:
            if len(self._text) > 10_000:
                self._text.clear()
            escaped = self._text[value] = str(value).translate(_COPY_ESCAPES)
        return escaped

    def _array_field(self, names) -> str:
        if names is None:
            return "\\N"
        key = tuple(names)
        literal = self._arrays.get(key)
        if literal is None:
            if len(self._arrays) > 10_000:
                self._arrays.clear()
            literal = self._arrays[key] = _array_literal(key).translate(_COPY_ESCAPES)
        return literal


def _array_literal(values) -> str:
    """A text[] literal: every element quoted, NULL for None."""
    return "{" + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for v in values) + "}"


class _TransientStoreError(Exception):
    """The store cannot take a batch now (down, slow, shutting down): keep the batch for later."""


class Spool:
    """A bounded local spill of analysed rows: JSON-lines segment files in spool_dir, replayed oldest first.

    Each line is one JSON document {"templates": {...}, "rows": [[...], ...]} with ts as epoch seconds.
    A writer holds an exclusive flock on the segment it appends to; once rotated (or once its process is
    gone) any writer using the same directory may claim it, replay it and delete it. So a restarted proxy,
    whose proxy id differs, still replays what its predecessor spooled. max_bytes bounds the directory.
    A crash between the store's commit and the deletion replays a segment twice (at least once delivery).
    """

    def __init__(self, directory: str, proxy_id: str, max_bytes: int):
        self.directory = Path(directory)
        self.prefix = "querylog-" + re.sub(r"[^A-Za-z0-9_.-]", "_", proxy_id) + "-"
        self.max_bytes = max_bytes
        self.segment_bytes = max(16 * 1024, min(2 * 1024 * 1024, max_bytes // 4))
        self.bytes = 0                 # all segments in the directory, as last counted plus our own changes
        self._active = None            # the segment we append to, flock'ed
        self._active_bytes = 0
        self._seq = 0
        self.usable = False

    def open(self) -> None:
        try:
            if self.max_bytes > 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.bytes = self._count_bytes()
                if self.bytes:
                    log.info("query log spool %s: %d bytes left by earlier runs, to replay", self.directory,
                             self.bytes)
                self.usable = True
        except OSError as e:
            log.error("query log spool %s unusable (%s): events will be dropped while the store is away",
                      self.directory, e)

    def _segments(self) -> list[Path]:
        paths = []
        for path in self.directory.glob("querylog-*.jsonl"):
            try:
                paths.append((path.stat().st_mtime, path.name, path))
            except OSError:
                pass    # replayed and removed by another writer meanwhile
        return [p for _, _, p in sorted(paths)]

    def _count_bytes(self) -> int:
        total = 0
        for path in self._segments():
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def has_segments(self) -> bool:
        return bool(self._active_bytes) or bool(self._segments())

    def append(self, batch: _Batch) -> int:
        """Write as many rows of the batch as fit; returns how many were written."""
        if not self.usable:
            return 0
        written = 0
        rows = batch.rows
        recounted = False
        for start in range(0, len(rows), _SPOOL_LINE_ROWS):
            chunk = rows[start:start + _SPOOL_LINE_ROWS]
            fps = {r[_FP] for r in chunk}
            templates = {fp: t for fp, t in batch.templates.items() if fp in fps}
            head = '{"templates":' + json.dumps(templates) + ',"rows":['
            encoded = [json.dumps(row) for row in chunk]
            room = self.max_bytes - self.bytes - len(head) - 3
            if room < len(encoded[0]) and not recounted:
                self.bytes = self._count_bytes()   # other writers may have replayed some meanwhile
                recounted = True
                room = self.max_bytes - self.bytes - len(head) - 3
            fitting = 0
            for text in encoded:
                room -= len(text) + 1
                if room < 0:
                    break
                fitting += 1
            if not fitting:
                break
            line = (head + ",".join(encoded[:fitting]) + "]}\n").encode("ascii")
            try:
                self._write(line)
            except OSError as e:
                log.error("query log spool write failed: %s", e)
                break
            written += fitting
            if fitting < len(chunk):
                break
        return written

    def _write(self, line: bytes) -> None:
        if self._active is None:
            path = self.directory / f"{self.prefix}{self._seq:08d}.jsonl"
            self._seq += 1
            # Locked before it appears under its .jsonl name, so no other writer can claim it half-written.
            pending = path.with_suffix(".new")
            f = open(pending, "ab")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(pending, path)
            self._active = f
            self._active_bytes = 0
        self._active.write(line)
        self._active.flush()
        self._active_bytes += len(line)
        self.bytes += len(line)
        if self._active_bytes >= self.segment_bytes:
            self.rotate()

    def rotate(self) -> None:
        """Close the segment we append to, which makes it replayable."""
        if self._active is not None:
            self._active.close()
            self._active = None
            self._active_bytes = 0

    def claim_oldest(self):
        """The oldest segment no other writer holds, opened and locked, or None."""
        if not self.usable:
            return None
        for attempt in range(2):
            for path in self._segments():
                try:
                    f = open(path, "rb")
                except OSError:
                    continue
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if os.fstat(f.fileno()).st_ino != path.stat().st_ino:
                        raise OSError("replaced meanwhile")
                except OSError:   # held by a live writer, or replayed and removed meanwhile
                    f.close()
                    continue
                return path, f
            if attempt == 0 and self._active_bytes:
                self.rotate()   # nothing else to replay: our own segment goes too
            else:
                break
        return None

    @staticmethod
    def parse_line(line: bytes) -> _Batch | None:
        try:
            doc = json.loads(line)
            return _Batch([tuple(r) for r in doc["rows"]], doc.get("templates", {}), 0)
        except (ValueError, KeyError, TypeError):
            log.warning("query log spool: a damaged line skipped")
            return None

    def release(self, claim, replayed: bool) -> None:
        path, f = claim
        try:
            if replayed:
                size = os.fstat(f.fileno()).st_size
                path.unlink()
                self.bytes = max(0, self.bytes - size)
        except OSError as e:
            log.warning("query log spool: cannot remove %s: %s", path, e)
        finally:
            f.close()

    def close(self) -> None:
        self.rotate()


class QueryLog:
    """Takes QueryEvents from the sessions and writes them to the log store in the background."""

    def __init__(self, cfg, store_dsn: str, proxy_id: str, *, analyzer: Analyzer | None = None,
                 stats: "QueryStats | None" = None):
        self.cfg = cfg
        self.store_dsn = store_dsn
        self.proxy_id = proxy_id
        self.analyzer = analyzer if analyzer is not None else Analyzer(cfg.analysis_cache_size)
        self.query_stats = stats if stats is not None else QueryStats(cfg.stats_max_templates)
        self.submitted = 0
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped = 0
        self._queue: deque[QueryEvent] = deque()
        self._queue_size = cfg.queue_size
        self._batch_size = cfg.batch_size
        self._wakeup: asyncio.Future | None = None
        # Called before a batch is taken from the queue: the anomaly scorer scores what it holds, so every
        # row carries its anomaly_score (proxy/served_models.py sets it).
        self.before_batch = None
        self._hook_log_at = 0.0
        self._settled = 0             # submitted events now written, spooled or dropped
        self._spool = Spool(cfg.spool_dir, proxy_id, cfg.spool_max_bytes)
        self._outbox: deque[_Batch] = deque()
        self._outbox_ready = asyncio.Event()   # set when a batch joins the outbox (or to wake the store task)
        self._outbox_space = asyncio.Event()   # set when a batch leaves it
        self._inflight: _Batch | None = None
        self._conn = None
        self._conn_lock = asyncio.Lock()
        self._known: set[str] = set()           # fingerprints the store has a templates row for
        self._last_seen: dict[str, float] = {}  # fingerprint -> latest ts written, for the periodic refresh
        self._partitions: set[int] = set()      # days (since the epoch, UTC) with a partition
        self._next_maintenance = 0.0
        self._next_refresh = 0.0
        self._addr_cache: dict[str, str | None] = {}
        self._encoder = CopyTextEncoder()
        self._closing = False         # stop(): the analyser drains the queue and ends
        self._store_closing = False   # stop(), once the analyser is done: the store task drains the outbox and ends
        self._tasks: list[asyncio.Task] = []
        self._drop_log_at = 0.0
        self._drops_unlogged = 0
        self._store_down = False

    # ---------------------------------------------------------------- the session's side

    def submit(self, event: QueryEvent) -> None:
        """Queue one event; O(1), never blocks, never raises."""
        try:
            self.submitted += 1
            q = self._queue
            if len(q) >= self._queue_size:
                self._settled += 1
                self._note_dropped(1, "queue full")
                return
            q.append(event)
            if len(q) >= self._batch_size:
                w = self._wakeup
                if w is not None and not w.done():
                    w.set_result(None)
        except Exception:  # a log problem must never reach a client
            pass

    def stats(self) -> dict[str, int]:
        return {
            "submitted": self.submitted, "written": self.written, "spooled": self.spooled,
            "replayed": self.replayed, "dropped": self.dropped, "queued": len(self._queue),
            "spool_bytes": self._spool.bytes, "store_connected": int(self._conn is not None),
            "templates_known": len(self._known), "analysis_cache_entries": len(self.analyzer),
            "analysis_cache_hits": self.analyzer.hits, "analysis_cache_misses": self.analyzer.misses,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._spool.open()
        self._tasks = [asyncio.get_running_loop().create_task(self._analyse_loop(), name="querylog-analyse"),
                       asyncio.get_running_loop().create_task(self._store_loop(), name="querylog-store")]
        log.info("query log: writing to %s as proxy %s", _redacted(self.store_dsn), self.proxy_id)

    async def stop(self) -> None:
        """Write what is queued (or spool it) within cfg.stop_timeout, then close."""
        if not self._tasks:
            return
        self._closing = True
        self._wake()
        self._outbox_ready.set()
        analyse, store = self._tasks
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.stop_timeout
        try:
            await asyncio.wait_for(asyncio.shield(analyse), self.cfg.stop_timeout)
            self._store_closing = True
            self._outbox_ready.set()
            await asyncio.wait_for(asyncio.shield(store), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            log.warning("query log: stop_timeout reached; what is left goes to the spool")
        except Exception as e:
            log.error("query log writer failed while stopping: %r", e)
        for task in self._tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Whatever did not make it: analysed batches go to the spool, unanalysed events are counted as dropped.
        if self._inflight is not None:
            self._outbox.appendleft(self._inflight)
            self._inflight = None
        while self._outbox:
            self._spool_batch(self._outbox.popleft())
        if self._queue:
            n = len(self._queue)
            self._queue.clear()
            self._settled += n
            self._note_dropped(n, "not written before shutdown")
        await self._close_conn()
        self._spool.close()
        log.info("query log stopped: %s", self.stats())

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the writer is connected to the store (for readiness checks); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._conn is None:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def flush(self, timeout: float = 30.0, include_spool: bool = False) -> bool:
        """Wait until every event submitted so far is written, spooled or dropped (and, with include_spool,
        until the spool is replayed). Returns False on timeout."""
        target = self.submitted
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._wake()
        while (self._settled < target or self._outbox or self._inflight is not None
               or (include_spool and self._spool.has_segments())):
            if loop.time() > deadline:
                return False
            self._wake()
            self._outbox_ready.set()
            await asyncio.sleep(0.01)
        return True

    # ---------------------------------------------------------------- analysis (background)

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    async def _analyse_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                fut = loop.create_future()
                self._wakeup = fut
                timer = loop.call_later(self.cfg.flush_interval, lambda: fut.done() or fut.set_result(None))
                try:
                    await fut
                finally:
                    timer.cancel()
                    self._wakeup = None
            while self._queue:
                if self.before_batch is not None:
                    try:
                        self.before_batch()
                    except Exception:   # someone else's hook must not stop the log
                        if time.monotonic() >= self._hook_log_at:
                            log.exception("query log: the before_batch hook failed")
                            self._hook_log_at = time.monotonic() + 60
                n = min(len(self._queue), self._batch_size)
                events = [self._queue.popleft() for _ in range(n)]
                try:
                    batch = await self._analyse(events)
                except Exception:  # never lose the writer to a bug: count and carry on
                    log.exception("query log: analysing a batch failed; %d events dropped", n)
                    self._settled += n
                    self._note_dropped(n, "analysis failed")
                    continue
                await self._hand_over(batch)

    async def _analyse(self, events: list[QueryEvent]) -> _Batch:
        rows: list[tuple] = []
        templates: dict[str, list] = {}
        known = self._known
        observe = self.query_stats.observe
        analyze = self.analyzer.analyze
        with_params = self.cfg.parameters
        settled = len(events)
        slice_start = time.perf_counter()
        for i, ev in enumerate(events):
            if not i & 31 and time.perf_counter() - slice_start > _ANALYSE_SLICE:
                await asyncio.sleep(0)
                slice_start = time.perf_counter()
            try:
                info = analyze(ev.sql)
                stmts = info.statements
                params = self._parameters(ev, info) if with_params else None
                idx = ev.stmt_index
                if len(stmts) == 1 or idx is not None:
                    if idx is not None and 0 <= idx < len(stmts):
                        s, params = stmts[idx], self._statement_params(params, stmts, idx, ev)
                    else:
                        s = info if len(stmts) > 1 else stmts[0]
                    row = self._row(ev, s, ev.ts, int(ev.duration_us), int(ev.wait_us), ev.rows,
                                    int(ev.bytes_out), ev.sqlstate, params)
                    rows.append(row)
                    observe(s.fingerprint, s.normalized, s.kind, row[1], row[7], row[9] is not None)
                    if s.fingerprint not in known:
                        self._note_template(templates, s, ev, idx if len(stmts) > 1 else None, row[0])
                else:
                    self._split(ev, stmts, params, rows, templates, observe)
            except Exception:
                self._settled += 1
                settled -= 1
                self._note_dropped(1, "malformed event")
                log.debug("query log: malformed event dropped", exc_info=True)
        return _Batch(rows, templates, settled)

    def _split(self, ev: QueryEvent, stmts: tuple[StatementInfo, ...], params, rows, templates, observe) -> None:
        k = len(stmts)
        duration, nbytes = int(ev.duration_us), int(ev.bytes_out)
        for i, s in enumerate(stmts):
            last = i == k - 1
            share = duration // k + (duration % k if last else 0)
            bshare = nbytes // k + (nbytes % k if last else 0)
            row = self._row(ev, s, ev.ts, share, int(ev.wait_us) if i == 0 else 0, ev.rows if last else None,
                            bshare, ev.sqlstate if last else None, self._statement_params(params, stmts, i, ev))
            rows.append(row)
            observe(s.fingerprint, s.normalized, s.kind, share, row[7], row[9] is not None)
            if s.fingerprint not in self._known:
                self._note_template(templates, s, ev, i, row[0])

    def _row(self, ev: QueryEvent, s: StatementInfo, ts, duration, wait, rows, nbytes, sqlstate, params) -> tuple:
        addr = ev.client_addr
        if addr is not None:
            cache = self._addr_cache
            addr = cache[addr] if addr in cache else self._check_addr(addr)
        pid, xact, in_xact = ev.backend_pid, ev.xact_id, ev.in_transaction
        # Coerced here so that one odd event is dropped on its own rather than making the store refuse a batch.
        return (float(ts), duration, wait, s.fingerprint, s.kind, s.tables_read, s.tables_written,
                None if rows is None else int(rows), nbytes, sqlstate, ev.database, ev.username,
                ev.application_name, addr, None if pid is None else int(pid), None if xact is None else int(xact),
                None if in_xact is None else bool(in_xact), ev.protocol, ev.cache_outcome, ev.rewrite,
                None if ev.anomaly_score is None else float(ev.anomaly_score), self.proxy_id, params)

    def _check_addr(self, addr: str) -> str | None:
        try:
            ipaddress.ip_address(addr)
            valid = addr
        except ValueError:
            try:
                ipaddress.ip_interface(addr)
                valid = addr
            except ValueError:
                valid = None    # a unix socket path, or something the inet column would refuse
        if len(self._addr_cache) > 10_000:
            self._addr_cache.clear()
        self._addr_cache[addr] = valid
        return valid

    def _parameters(self, ev: QueryEvent, info: StatementInfo) -> list[str | None] | None:
        if ev.parameters is not None:
            return [None if p is None else _clean_text(p) for p in ev.parameters]
        if ev.protocol == "simple" and info.literal_count:
            return [_clean_text(v) for v in extract_literals(ev.sql)]
        return None

    @staticmethod
    def _statement_params(params, stmts: tuple[StatementInfo, ...], idx: int, ev: QueryEvent):
        """A multi-statement text's extracted literals belong to its statements in order."""
        if params is None or len(stmts) == 1 or ev.parameters is not None:
            return params
        start = sum(s.literal_count for s in stmts[:idx])
        return params[start:start + stmts[idx].literal_count] or None

    def _note_template(self, templates: dict, s: StatementInfo, ev: QueryEvent, idx, ts: float) -> None:
        t = templates.get(s.fingerprint)
        if t is not None:
            t[5] = min(t[5], ts)
            t[6] = max(t[6], ts)
            return
        sample = None
        if self.cfg.parameters:
            sample = ev.sql if idx is None else _statement_text(ev.sql, idx)
        templates[s.fingerprint] = [s.normalized, s.kind, list(s.tables_read), list(s.tables_written), sample,
                                    ts, ts]

    async def _hand_over(self, batch: _Batch) -> None:
        if not batch.rows:
            self._settled += batch.events
            return
        # A busy store gets up to write_timeout to make room (events wait in the queue meanwhile);
        # a store known to be away, or too slow for that, sends batches straight to the spool.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.write_timeout
        while not self._store_down and len(self._outbox) >= _OUTBOX_BATCHES and loop.time() < deadline:
            self._outbox_space.clear()
            try:
                await asyncio.wait_for(self._outbox_space.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        if not self._store_down and len(self._outbox) < _OUTBOX_BATCHES:
            self._outbox.append(batch)
            self._outbox_ready.set()
        else:
            self._spool_batch(batch)

    def _spool_batch(self, batch: _Batch) -> None:
        n = len(batch.rows)
        kept = self._spool.append(batch) if n else 0
        self.spooled += kept
        if kept < n:
            self._note_dropped(n - kept, "spool full" if self._spool.usable else "no spool")
        self._settled += batch.events

    def _note_dropped(self, n: int, reason: str) -> None:
        self.dropped += n
        self._drops_unlogged += n
        now = time.monotonic()
        if now >= self._drop_log_at:
            log.warning("query log: %d event(s) dropped (%s); %d dropped in total",
                        self._drops_unlogged, reason, self.dropped)
            self._drops_unlogged = 0
            self._drop_log_at = now + _DROP_LOG_EVERY

    # ---------------------------------------------------------------- the store (background)

    async def _store_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while True:
            if self._conn is None:
                if self._store_closing:
                    return
                try:
                    await asyncio.wait_for(self._connect(), self.cfg.write_timeout)
                    backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    await self._close_conn()
                    self._store_unavailable(e)
                    await self._pause(backoff)
                    backoff = min(backoff * 2, self.cfg.reconnect_max_backoff)
                    continue
            try:
                if self._outbox:
                    batch = self._inflight = self._outbox.popleft()
                    self._outbox_space.set()
                    await self._ship(batch)
                    self._inflight = None
                    self.written += len(batch.rows)
                    self._settled += batch.events
                elif self._store_closing:
                    await self._refresh_last_seen()
                    return
                elif await self._replay_oldest():
                    pass
                elif loop.time() >= self._next_maintenance:
                    await self.run_maintenance()
                elif loop.time() >= self._next_refresh:
                    await self._refresh_last_seen()
                else:
                    self._outbox_ready.clear()
                    wait = min(self._next_maintenance, self._next_refresh) - loop.time()
                    try:
                        await asyncio.wait_for(self._outbox_ready.wait(), max(0.01, wait))
                    except asyncio.TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not _is_transient(e):
                    log.exception("query log: store housekeeping failed")
                    self._next_maintenance = loop.time() + _MAINTENANCE_EVERY
                    self._next_refresh = loop.time() + self.cfg.templates_refresh_interval
                    continue
                # The connection is gone or unusable: everything waiting for it goes to the spool.
                await self._close_conn()
                self._store_unavailable(e)
                if self._inflight is not None:
                    self._spool_batch(self._inflight)
                    self._inflight = None
                while self._outbox:
                    self._spool_batch(self._outbox.popleft())
                self._outbox_space.set()

    async def _pause(self, seconds: float) -> None:
        self._outbox_ready.clear()
        try:
            await asyncio.wait_for(self._outbox_ready.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        # Batches that arrived while the store is away go to the spool without waiting for it.
        while self._outbox:
            self._spool_batch(self._outbox.popleft())
        self._outbox_space.set()

    def _store_unavailable(self, e: Exception) -> None:
        if not self._store_down:
            log.warning("query log store %s unavailable (%s: %s); spooling to %s",
                        _redacted(self.store_dsn), type(e).__name__, e, self._spool.directory)
            self._store_down = True

    async def _connect(self) -> None:
        import asyncpg  # the proxy imports this module even with the query log off
        conn = await asyncpg.connect(
            self.store_dsn, timeout=self.cfg.write_timeout,
            server_settings={"application_name": "pgpilot-querylog", "timezone": "UTC",
                             "synchronous_commit": "off"})
        try:
            try:
                await logstore.ensure_schema(conn)
            except Exception as e:
                if not _is_transient(e):
                    # Another proxy creating the same objects at the same moment: once more is enough.
                    await logstore.ensure_schema(conn)
                else:
                    raise
            self._partitions = await self._load_partitions(conn)
        except BaseException:
            await conn.close(timeout=1)
            raise
        self._conn = conn
        self._next_maintenance = 0.0
        self._next_refresh = asyncio.get_running_loop().time() + self.cfg.templates_refresh_interval
        if self._store_down:
            log.info("query log store %s is back", _redacted(self.store_dsn))
            self._store_down = False

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 1)
            except BaseException:
                conn.terminate()

    async def _ship(self, batch: _Batch) -> None:
        """Write one batch; raises on a transient failure, drops (counted) a batch the store refuses."""
        try:
            await asyncio.wait_for(self._write(batch), self.cfg.write_timeout)
            return
        except asyncio.TimeoutError:
            raise _TransientStoreError("write timed out") from None
        except Exception as e:
            if _is_transient(e):
                raise
            first_error = e
        # A refusal: schema or partitions missing (dropped behind our back) or odd data. Set up, try once more.
        try:
            async with self._conn_lock:
                await logstore.ensure_schema(self._conn)
                self._partitions = await self._load_partitions(self._conn)
            await asyncio.wait_for(self._write(batch), self.cfg.write_timeout)
        except asyncio.TimeoutError:
            raise _TransientStoreError("write timed out") from None
        except Exception as e:
            if _is_transient(e):
                raise
            log.error("query log store refused a batch of %d rows (%s; first %s): dropped",
                      len(batch.rows), e, first_error)
            self._note_dropped(len(batch.rows), "refused by the store")
            batch.rows = []

    async def _write(self, batch: _Batch) -> None:
        conn = self._conn
        if conn is None:
            raise _TransientStoreError("not connected")
        rows = batch.rows
        days = {_day_of(r[0]) for r in rows}
        missing = days - self._partitions
        if missing:
            expired = await self._create_partitions(missing)
            if expired:
                kept = [r for r in rows if _day_of(r[0]) not in expired]
                self._note_dropped(len(rows) - len(kept), "older than retention_days")
                batch.rows = rows = kept
        new = sorted((fp, t) for fp, t in batch.templates.items() if fp not in self._known)
        async with self._conn_lock:
            async with conn.transaction():
                if new:
                    await conn.executemany(_UPSERT_TEMPLATE, [
                        (fp, t[0], t[1], t[2], t[3], dt.datetime.fromtimestamp(t[5], _UTC),
                         dt.datetime.fromtimestamp(t[6], _UTC), t[4]) for fp, t in new])
                # Several COPYs of a bounded size, so encoding never holds the event loop for long.
                for start in range(0, len(rows), _COPY_ROWS):
                    data = self._encoder.encode(rows[start:start + _COPY_ROWS])
                    await conn.copy_to_table("query_events", schema_name="pgpilot", columns=COLUMNS,
                                             source=io.BytesIO(data), format="text")
        self._known.update(fp for fp, _ in new)
        if len(self._known) > 200_000:
            self._known = {fp for fp, _ in new}
        seen = self._last_seen
        for r in rows:
            fp = r[_FP]
            if r[0] > seen.get(fp, 0.0):
                seen[fp] = r[0]

    async def _replay_oldest(self) -> bool:
        """Replay one spool segment if there is one to claim; returns whether there was."""
        claim = self._spool.claim_oldest()
        if claim is None:
            return False
        replayed = False
        try:
            rows: list[tuple] = []
            templates: dict[str, list] = {}
            for line in claim[1].read().splitlines():
                batch = self._spool.parse_line(line)
                if batch is not None:
                    rows.extend(batch.rows)
                    templates.update(batch.templates)
                await asyncio.sleep(0)   # a segment is megabytes of JSON: let clients through between lines
            if rows:
                batch = _Batch(rows, templates, 0)
                await self._ship(batch)
                self.written += len(batch.rows)
                self.replayed += len(batch.rows)
            replayed = True
        finally:
            self._spool.release(claim, replayed)
        if replayed and not self._spool.has_segments():
            log.info("query log spool replayed (%d rows so far)", self.replayed)
        return True

    async def _load_partitions(self, conn) -> set[int]:
        days = set()
        for rec in await conn.fetch(_PARTITIONS):
            m = _PARTITION_NAME.match(rec["relname"])
            if m:
                day = dt.datetime.strptime(m.group(1), "%Y%m%d").date()
                days.add((day - _EPOCH).days)
        return days

    async def _create_partitions(self, days: set[int]) -> set[int]:
        """Create partitions for these days; returns the days too old to keep (their rows are dropped)."""
        cutoff = _today() - self.cfg.retention_days
        expired = {d for d in days if d < cutoff}
        async with self._conn_lock:
            for day in sorted(days - expired):
                try:
                    await self._conn.execute(logstore.partition_ddl(_date_of_day(day)))
                except Exception as e:
                    if _is_transient(e):
                        raise
                    # Created by another proxy at the same moment: check below.
                self._partitions.add(day)
        return expired

    async def run_maintenance(self) -> list[str]:
        """Create today's and tomorrow's partitions, drop those older than retention_days; returns the
        names of the dropped partitions. Runs on every connect and every few minutes."""
        loop = asyncio.get_running_loop()
        self._next_maintenance = loop.time() + _MAINTENANCE_EVERY
        conn = self._conn
        if conn is None:
            return []
        today = _today()
        await self._create_partitions({today, today + 1} - self._partitions)
        cutoff = today - self.cfg.retention_days
        dropped = []
        async with self._conn_lock:
            self._partitions = await self._load_partitions(conn)
            for day in sorted(d for d in self._partitions if d < cutoff):
                name = logstore.partition_name(_date_of_day(day))
                try:
                    async with conn.transaction():
                        # Readers (the learner) may hold the table: wait a little, try again next time.
                        await conn.execute("SET LOCAL lock_timeout = '2s'")
                        await conn.execute(f"DROP TABLE IF EXISTS pgpilot.{name}")
                except Exception as e:
                    if _is_transient(e) and not _is_lock_timeout(e):
                        raise
                    log.warning("query log: could not drop expired partition %s yet: %s", name, e)
                    continue
                self._partitions.discard(day)
                dropped.append(name)
        if dropped:
            log.info("query log: dropped expired partitions %s", ", ".join(dropped))
        return dropped

    async def _refresh_last_seen(self) -> None:
        self._next_refresh = asyncio.get_running_loop().time() + self.cfg.templates_refresh_interval
        if not self._last_seen or self._conn is None:
            return
        seen, self._last_seen = self._last_seen, {}
        fps = sorted(seen)
        try:
            async with self._conn_lock:
                await asyncio.wait_for(self._conn.execute(
                    _REFRESH_LAST_SEEN, fps, [dt.datetime.fromtimestamp(seen[fp], _UTC) for fp in fps]),
                    self.cfg.write_timeout)
        except BaseException as e:
            for fp, ts in seen.items():   # keep them for the next try
                if ts > self._last_seen.get(fp, 0.0):
                    self._last_seen[fp] = ts
            sqlstate = getattr(e, "sqlstate", None)
            if not isinstance(sqlstate, str) or sqlstate[:2] in ("08", "57"):
                raise   # the connection is gone (or we are cancelled)
            # A deadlock with another proxy's refresh, say: the connection is fine, try again next time.
            log.warning("query log: templates.last_seen refresh failed (%s), retried later", e)


def _is_transient(e: BaseException) -> bool:
    """Worth retrying later with the same rows (store away, overloaded, shutting down), as opposed to a refusal."""
    if isinstance(e, (ValueError, TypeError)):   # rows the client library cannot encode (asyncpg.DataError too)
        return False
    if isinstance(e, (_TransientStoreError, OSError, asyncio.TimeoutError)):
        return True
    sqlstate = getattr(e, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return True   # asyncpg.InterfaceError and the like: the connection is not usable


def _is_lock_timeout(e: BaseException) -> bool:
    return getattr(e, "sqlstate", None) == "55P03"


def _clean_text(value) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    elif not isinstance(value, str):
        value = str(value)
    return value.replace("\x00", "") if "\x00" in value else value


def _statement_text(sql: str, idx: int) -> str | None:
    from pglast import parser as pg_parser
    try:
        parts = pg_parser.split(sql, with_parser=False)
        return parts[idx] if 0 <= idx < len(parts) else None
    except Exception:
        return None


class _TemplateStats:
    __slots__ = ("fingerprint", "normalized", "kind", "calls", "total_us", "max_us", "rows", "errors", "samples")

    def __init__(self, fingerprint: str, normalized: str, kind: str):
        self.fingerprint = fingerprint
        self.normalized = normalized
        self.kind = kind
        self.calls = 0
        self.total_us = 0
        self.max_us = 0
        self.rows = 0
        self.errors = 0
        self.samples: list[int] = []   # a uniform reservoir of durations, for percentiles


class QueryStats:
    """Per-template counters in memory for SHOW QUERIES: calls, time (total, mean, p95, max), rows, errors.

    At most max_templates are tracked; past that the least called ones are forgotten (in chunks of a tenth,
    so eviction is amortized). p95 comes from a fixed-size uniform reservoir of durations per template.
    """

    COLUMNS = ("fingerprint", "kind", "calls", "total_ms", "mean_ms", "p95_ms", "max_ms", "rows", "errors", "query")
    ORDERS = ("total_time", "calls", "mean_time", "p95_time", "max_time", "rows", "errors")

    def __init__(self, max_templates: int = 5000, reservoir_size: int = 64):
        self.max_templates = max_templates
        self.reservoir_size = reservoir_size
        self._templates: dict[str, _TemplateStats] = {}
        self._random = random.Random(0x5eed).random

    def __len__(self) -> int:
        return len(self._templates)

    def observe(self, fingerprint: str, normalized: str, kind: str, duration_us: int, rows: int | None,
                failed: bool) -> None:
        t = self._templates.get(fingerprint)
        if t is None:
            if len(self._templates) >= self.max_templates + max(1, self.max_templates // 10):
                self._evict()
            t = self._templates[fingerprint] = _TemplateStats(fingerprint, normalized, kind)
        t.calls += 1
        t.total_us += duration_us
        if duration_us > t.max_us:
            t.max_us = duration_us
        if rows:
            t.rows += rows
        if failed:
            t.errors += 1
        samples = t.samples
        if len(samples) < self.reservoir_size:
            samples.append(duration_us)
        else:
            j = int(self._random() * t.calls)
            if j < self.reservoir_size:
                samples[j] = duration_us

    def _evict(self) -> None:
        excess = len(self._templates) - self.max_templates + max(1, self.max_templates // 10)
        for t in heapq.nsmallest(excess, self._templates.values(), key=lambda t: t.calls):
            del self._templates[t.fingerprint]

    def reset(self) -> None:
        self._templates.clear()

    def top(self, n: int = 20, by: str = "total_time") -> list[dict]:
        """The n templates with the most `by` (one of ORDERS), as rows keyed by COLUMNS (times in ms)."""
        key = {
            "total_time": lambda t: t.total_us, "calls": lambda t: t.calls,
            "mean_time": lambda t: t.total_us / t.calls, "p95_time": _p95, "max_time": lambda t: t.max_us,
            "rows": lambda t: t.rows, "errors": lambda t: t.errors,
        }.get(by)
        if key is None:
            raise ValueError(f"unknown order {by!r}; expected one of {', '.join(self.ORDERS)}")
        return [{
            "fingerprint": t.fingerprint, "kind": t.kind, "calls": t.calls,
            "total_ms": round(t.total_us / 1000, 3), "mean_ms": round(t.total_us / t.calls / 1000, 3),
            "p95_ms": round(_p95(t) / 1000, 3), "max_ms": round(t.max_us / 1000, 3), "rows": t.rows,
            "errors": t.errors, "query": t.normalized,
        } for t in heapq.nlargest(n, self._templates.values(), key=key)]


def _p95(t: _TemplateStats) -> float:
    s = sorted(t.samples)
    if not s:
        return 0.0
    return float(s[min(len(s) - 1, int(0.95 * len(s)))])
