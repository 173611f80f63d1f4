"""Query events: what the proxy records for every statement, and the writer that ships them to the log store.

Contract with the session
-------------------------
* For every statement the session appends one record to the `StatementFeed` (`feed.records.append(record)`):
  a plain tuple of raw facts in `RECORD` order (times, counts, the SQL text as sent, and a `SessionInfo`
  shared by every statement of the session). Nothing else happens per statement on the client's path.
* Every `interval` the feed takes the records there are, analyses each text once (fingerprint, normalized
  text, kind, tables; see proxy/analysis.py; cached per text, shared with the anomaly scorer), lets the scorer
  score the batch (proxy/scoring.py), and hands records, analyses and scores to the query log.
* `QueryLog.submit(QueryEvent)` is the same for whoever holds an event object (cache hits, tools, tests):
  O(1), bounded by `queue_size`, never blocks, awaits or raises.
* A simple-protocol Query message may carry several statements. The session sends one record per
  CommandComplete/ErrorResponse with the whole text and `stmt_index` = which statement of the text
  (0-based) completed; the writer logs that statement only, with the record's timings and counts as they are.
* An event whose text holds several statements but has `stmt_index=None` is split into one row per statement:
  `duration_us` and `bytes_out` are shared out evenly (their sums are kept), `wait_us` goes to the first
  statement, `rows` and `sqlstate` to the last one (an error ends a simple Query). This is approximate;
  sessions that know the boundaries send `stmt_index`.
* `parameters`: bound parameter values of an extended-protocol Execute (the session keeps the client's Bind
  message only with `query_log.parameters` on; values in text format are stored as text, binary ones as
  `\\x` and hex). With it on, simple-protocol events get their literal values extracted instead. With it off
  no literal ever reaches the store: statements are stored as fingerprint + normalized text.

The writer
----------
As the feed hands records over (every 40 ms), the query log folds them into groups: statements that share
their analysis, session, protocol, cache outcome and rewrite, their own values (times, counts, SQLSTATE, pid,
transaction, score) in one list per field. It also feeds the in-memory `QueryStats` (for SHOW QUERIES) then.
A background task takes the groups as a batch (once `batch_size` records wait, or every `flush_interval`) and
hands them to a second task that owns one asyncpg connection to the store: it upserts new templates and COPYs
one pgpilot.query_event_groups row per group (the per-statement values in arrays; readers see one row per
statement in the pgpilot.query_events view) in one transaction, keeps tomorrow's partitions created and drops
partitions older than `retention_days`. Spool replays go to pgpilot.query_event_rows, one row per statement.
When the store is slow or away, batches spill to a bounded spool on local disk and are
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
import itertools
import ipaddress
import json
import logging
import math
import operator
import os
import random
import re
import struct
import time
import weakref
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

from proxy import copy_binary, logstore
from proxy.analysis import Analyzer, StatementInfo, extract_literals, literal_key

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


# A statement record, as the session appends it to the feed: one tuple, fields in this order.
RECORD = ("ts", "duration_us", "wait_us", "sql", "rows", "bytes_out", "sqlstate", "session", "backend_pid",
          "xact_id", "in_transaction", "stmt_index", "parameters", "cache_outcome", "rewrite", "anomaly_score")
(R_TS, R_DURATION, R_WAIT, R_SQL, R_ROWS, R_BYTES, R_SQLSTATE, R_SESSION, R_PID, R_XACT, R_IN_XACT, R_STMT,
 R_PARAMS, R_CACHE, R_REWRITE, R_SCORE) = range(len(RECORD))
# R_SQL: bytes (the session) or str. R_STMT: -1 for the extended protocol; for a simple Query the index of the
# statement of the text that completed, or None for the whole text. R_PARAMS: the client's Bind message (bytes)
# or a list of values, only with query_log.parameters on.


def event_record(ev: QueryEvent) -> tuple:
    """The record of an event object (coerced, so that an odd event fails here, alone)."""
    if ev.sql is None:
        raise ValueError("an event without SQL text")
    stmt = -1 if ev.protocol == "extended" else (None if ev.stmt_index is None else int(ev.stmt_index))
    return (float(ev.ts), int(ev.duration_us), int(ev.wait_us), ev.sql,
            None if ev.rows is None else int(ev.rows), int(ev.bytes_out), ev.sqlstate,
            session_info(ev.database, ev.username, ev.application_name, ev.client_addr),
            None if ev.backend_pid is None else int(ev.backend_pid), None if ev.xact_id is None else int(ev.xact_id),
            None if ev.in_transaction is None else bool(ev.in_transaction), stmt, ev.parameters, ev.cache_outcome,
            ev.rewrite, None if ev.anomaly_score is None else float(ev.anomaly_score))


class SenderErrors:
    """When a sender (client address and application, as the scorer counts errors) last failed a statement: its
    sessions' statements take the scorer's inline lane only once that is further back than the error window."""

    __slots__ = ("quiet_after", "__weakref__")

    def __init__(self):
        self.quiet_after = -math.inf   # time.perf_counter() before which a statement may have recent errors


class SessionInfo:
    """Who sent a statement: one shared object per (database, user, application, client address).

    `lane_q` and `lane_x` are the anomaly scorer's inline lane for this sender (proxy.scoring, "inline lane"):
    statement shape (simple Query, digits made 0) or exact text (extended protocol) -> {bytes sent: (shortest,
    longest duration in us, rows)} known to score below the threshold. The scorer fills and empties them."""

    __slots__ = ("database", "username", "application_name", "client_addr", "store_addr", "copy_fields", "sender",
                 "errors", "lane_q", "lane_x")

    def __init__(self, database: str, username: str, application_name: str, client_addr: str | None):
        self.database = database
        self.username = username
        self.application_name = application_name
        self.client_addr = client_addr
        self.store_addr = _inet_or_none(client_addr)   # what the inet column takes (not a unix socket path)
        # Its four fields of a query_event_groups row, in COPY's binary format.
        self.copy_fields = b"".join((copy_binary.text(database), copy_binary.text(username),
                                     copy_binary.text(application_name), copy_binary.inet(self.store_addr)))
        self.sender = f"{client_addr or ''}|{application_name or ''}"   # as ServingContext.observe names it
        errors = _senders.get(self.sender)
        if errors is None:
            errors = _senders[self.sender] = SenderErrors()
        self.errors = errors           # shared by every SessionInfo of the same sender
        self.lane_q: dict = {}
        self.lane_x: dict = {}


_sessions: dict[tuple, SessionInfo] = {}
# Every SessionInfo of a sender shares one SenderErrors while any of them lives, also one _sessions has forgotten.
_senders: "weakref.WeakValueDictionary[str, SenderErrors]" = weakref.WeakValueDictionary()


def session_info(database: str, username: str, application_name: str, client_addr: str | None) -> SessionInfo:
    key = (database, username, application_name, client_addr)
    info = _sessions.get(key)
    if info is None:
        if len(_sessions) >= 10_000:
            _sessions.clear()
        info = _sessions[key] = SessionInfo(*key)
    return info


def _inet_or_none(addr: str | None) -> str | None:
    if addr is None:
        return None
    try:
        ipaddress.ip_address(addr)
        return addr
    except ValueError:
        try:
            ipaddress.ip_interface(addr)
            return addr
        except ValueError:
            return None    # a unix socket path, or something the inet column would refuse


def statement_of(info: StatementInfo, idx: int | None) -> StatementInfo:
    """The statement a record is about: the one completed (idx), the only one, or the whole text."""
    stmts = info.statements
    if len(stmts) == 1:
        return stmts[0]
    if idx is not None and 0 <= idx < len(stmts):
        return stmts[idx]
    return info


class StatementFeed:
    """Finished statements on their way to the scorer and the query log.

    Sessions append records to `records` (a list: one C-level append each). Every `interval` seconds (40 ms at most,
    so that analysing a batch never holds the event loop for long) `tick` takes them, analyses each text once (by
    the exact bytes first: prepared and extended statements repeat the same text object), lets the scorer score
    them, then hands them to the query log. Records whose text cannot be analysed (never from a session) get None as
    their analysis and are dropped by both.
    """

    def __init__(self, analyzer: Analyzer, interval: float):
        self.records: list[tuple] = []
        self.analyzer = analyzer
        self.interval = interval
        self.scorer = None            # proxy.scoring.AnomalyScorer, or None
        self.query_log: "QueryLog | None" = None
        self._by_text: dict = {}      # exact text (bytes or str) -> StatementInfo
        self._by_shape: dict = {}     # text with every ASCII digit made 0 -> StatementInfo, where that is sound
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ticks = 0

    def start(self) -> None:
        """Start ticking (again, with the current interval, if already started)."""
        if self._timer is not None:
            self._timer.cancel()
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(self.interval, self._scheduled)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def _scheduled(self) -> None:
        self._timer = self._loop.call_later(self.interval, self._scheduled)
        try:
            self.tick()
        except Exception:  # never lose the feed to a bug: the batch is lost, counted by the query log
            log.exception("statement feed: a batch failed")

    def tick(self) -> None:
        """Analyse, score and log whatever has arrived (also called directly to flush)."""
        records = self.records
        n = len(records)
        ql = self.query_log
        extra = ql._take_events() if ql is not None and ql._events else None
        if not n and not extra:
            return
        batch = records[:n]
        del records[:n]
        counted = 0
        if extra:
            counted = len(extra)
            batch = extra + batch   # submit()ted events were counted as they came
        self.ticks += 1
        infos = self.analyse(batch)
        scores = None
        if self.scorer is not None:
            scores = self.scorer.score_records(batch, infos)
        if ql is not None:
            ql._take(batch, infos, scores, counted)

    def analyse(self, records: list[tuple]) -> list:
        """The whole text's StatementInfo per record (None where the text cannot be analysed).

        Simple-protocol texts repeat with other numbers in them (pgbench -S sends a new text per query). A text
        whose digits all belong to literals (its literal-stripped key has none left) is also remembered by its
        shape, the text with every ASCII digit made 0: another text of that shape differs from it only in the
        digits of those same literals, so it has the same analysis, found without the literal-stripping
        regex. Texts with digits elsewhere (t1, $1, varchar(10) in DDL) are remembered by their exact text only.
        """
        by_text, by_shape = self._by_text, self._by_shape
        texts = list(map(_SQL_OF, records))
        infos = list(map(by_text.get, texts))     # C loops: prepared and extended texts are all found here
        if None in infos:
            for i, info in enumerate(infos):
                if info is None:
                    sql = texts[i]
                    shape = sql.translate(_ZERO_BYTES if type(sql) is bytes else _ZERO_STR)
                    info = by_shape.get(shape)
                    if info is None:
                        try:
                            info = self._analyse_new(sql, shape)
                        except Exception:
                            continue
                    infos[i] = info
        return infos

    def shape_key(self, sql: bytes, info: StatementInfo) -> bytes | None:
        """sql's shape (ZERO_DIGITS) if analyse() gives every text of that shape `info`, else None."""
        shape = sql.translate(_ZERO_BYTES)
        if self._by_shape.get(shape) is info or (shape == sql and self._by_text.get(sql) is info):
            return shape
        return None

    def _analyse_new(self, sql, shape) -> StatementInfo:
        text = sql if type(sql) is str else sql.decode("utf-8", "replace")
        info = self.analyzer.analyze(text)
        key, clean = literal_key(text)
        if clean and info.shareable and key != text and _DIGIT.search(key) is None:
            if len(self._by_shape) >= 20_000:
                self._by_shape.clear()
            self._by_shape[shape] = info
        else:
            if len(self._by_text) >= 20_000:
                self._by_text.clear()
            self._by_text[sql] = info
        return info


_SQL_OF = operator.itemgetter(R_SQL)
_SINGLE = operator.attrgetter("single")
_PROTOCOL_OF = {-1: "extended"}   # by a record's statement index: -1 for an Execute, else a simple Query
ZERO_DIGITS = _ZERO_BYTES = bytes.maketrans(b"123456789", b"000000000")   # a simple Query's shape
_ZERO_STR = str.maketrans("123456789", "000000000")
_DIGIT = re.compile(r"\d")


def _single(i: int):
    """An itemgetter of one index that, like itemgetter of several, returns a tuple."""
    return lambda seq: (seq[i],)


COLUMNS = ("ts", "duration_us", "wait_us", "fingerprint", "kind", "tables_read", "tables_written", "rows",
           "bytes_out", "sqlstate", "database", "username", "application_name", "client_addr", "backend_pid",
           "xact_id", "in_transaction", "protocol", "cache_outcome", "rewrite", "anomaly_score", "proxy_id",
           "parameters")
_FP = COLUMNS.index("fingerprint")
# pgpilot.query_event_groups, as the writer COPYs it: the group's shared fields, then one array per statement field.
GROUP_COLUMNS = ("ts", "fingerprint", "kind", "tables_read", "tables_written", "database", "username",
                 "application_name", "client_addr", "protocol", "cache_outcome", "rewrite", "proxy_id", "offsets_us",
                 "duration_us", "wait_us", "rows", "bytes_out", "sqlstate", "backend_pid", "xact_id",
                 "in_transaction", "anomaly_score", "parameters")

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
SELECT p.relname AS parent, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE n.nspname = 'pgpilot' AND p.relname IN ('query_event_groups', 'query_event_rows')
"""
_PARTITION_DAY = re.compile(r"_(\d{8})$")   # query_event_groups_YYYYMMDD (or query_events_YYYYMMDD, renamed)

_DAY = 86400
_EPOCH = dt.date(1970, 1, 1)
_UTC = dt.timezone.utc
_FEED_INTERVAL = 0.04         # seconds between two takes of the feed, at most: anomaly.score_interval's default
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
    """Analysed statements ready for the store, with the templates among them that the store may not know yet."""

    __slots__ = ("rows", "groups", "templates", "events")

    def __init__(self, rows: list[tuple] | None, templates: dict[str, list], events: int,
                 groups: "list[_Group] | None" = None):
        # Either groups of statements (as the writer makes them) or full rows (tuples in COLUMNS order, ts as epoch
        # seconds: spool replays).
        self.rows = rows if rows is not None else []
        self.groups = groups
        # fingerprint -> [normalized_sql, kind, tables_read, tables_written, sample_sql, first_seen, last_seen]
        self.templates = templates
        self.events = events            # submitted events this batch settles (0 for spool replays)

    def __len__(self) -> int:
        """Statements (log rows) in the batch."""
        return sum(map(len, self.groups)) if self.groups is not None else len(self.rows)

    def clear(self) -> None:
        self.rows, self.groups = [], None

    def full_rows(self, proxy_id: str) -> list[tuple]:
        if self.groups is None:
            return self.rows
        return [row for g in self.groups for row in g.full_rows(proxy_id)]


class _Group:
    """Statements that share one query_event_groups row (statement analysis, session, protocol, cache outcome,
    rewrite), their own values kept in columns: a batch holds a few lists per group, not an object per statement
    (which the cyclic garbage collector would walk again and again while the batch waits for the store)."""

    __slots__ = ("statement", "session", "protocol", "cache_outcome", "rewrite", "ts", "duration", "wait", "rows",
                 "bytes_out", "sqlstate", "pid", "xact", "in_xact", "score", "params")

    def __init__(self, statement: StatementInfo, session: "SessionInfo", protocol: str, cache_outcome, rewrite):
        self.statement = statement
        self.session = session
        self.protocol = protocol
        self.cache_outcome = cache_outcome
        self.rewrite = rewrite
        self.ts: list = []
        self.duration: list = []
        self.wait: list = []
        self.rows: list = []
        self.bytes_out: list = []
        self.sqlstate: list = []
        self.pid: list = []
        self.xact: list = []
        self.in_xact: list = []
        self.score: list = []
        self.params: list = []

    def __len__(self) -> int:
        return len(self.ts)

    def add(self, ts, duration, wait, nrows, nbytes, sqlstate, pid, xact, in_xact, score, params) -> None:
        self.ts.append(ts)
        self.duration.append(duration)
        self.wait.append(wait)
        self.rows.append(nrows)
        self.bytes_out.append(nbytes)
        self.sqlstate.append(sqlstate)
        self.pid.append(pid)
        self.xact.append(xact)
        self.in_xact.append(in_xact)
        self.score.append(score)
        self.params.append(params)

    def extend(self, columns) -> None:
        """Add statements given as one sequence per field, in add()'s order."""
        (ts, duration, wait, nrows, nbytes, sqlstate, pid, xact, in_xact, score) = columns
        self.ts.extend(ts)
        self.duration.extend(duration)
        self.wait.extend(wait)
        self.rows.extend(nrows)
        self.bytes_out.extend(nbytes)
        self.sqlstate.extend(sqlstate)
        self.pid.extend(pid)
        self.xact.extend(xact)
        self.in_xact.extend(in_xact)
        self.score.extend(score)
        self.params.extend(itertools.repeat(None, len(ts)))

    def columns(self) -> tuple[list, ...]:
        return (self.ts, self.duration, self.wait, self.rows, self.bytes_out, self.sqlstate, self.pid, self.xact,
                self.in_xact, self.score, self.params)

    def by_day(self) -> "list[tuple[float, float, _Group]]":
        """(earliest ts, latest ts, group) for each day the statements fall on: a row goes to one day's partition."""
        first, last = min(self.ts), max(self.ts)
        if _day_of(first) == _day_of(last):
            return [(first, last, self)]
        days: dict[int, _Group] = {}
        for values in zip(*self.columns()):
            day = _day_of(values[0])
            g = days.get(day)
            if g is None:
                g = days[day] = _Group(self.statement, self.session, self.protocol, self.cache_outcome, self.rewrite)
            g.add(*values)
        return [(min(g.ts), max(g.ts), g) for g in days.values()]

    def full_rows(self, proxy_id: str) -> list[tuple]:
        s, who = self.statement, self.session
        return [(ts, dur, wait, s.fingerprint, s.kind, s.tables_read, s.tables_written, nrows, nbytes, sqlstate,
                 who.database, who.username, who.application_name, who.store_addr, pid, xact, in_xact, self.protocol,
                 self.cache_outcome, self.rewrite, score, proxy_id, params)
                for ts, dur, wait, nrows, nbytes, sqlstate, pid, xact, in_xact, score, params in zip(*self.columns())]


_GROUP_MAX = 1000   # statements per group, at most: bounds a row's arrays and the time to encode one COPY


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class CopyTextEncoder:
    """Per-statement rows (query_event_rows: spool replays) as COPY text format, with the repeating parts (names,
    table lists, the second of ts) cached. Cheaper in CPU than asyncpg's generic binary COPY of the same records,
    which parses every inet value again and checks every array's type. Group rows go through GroupCopyEncoder.
    """

    def __init__(self):
        self._text: dict[str, str] = {}
        self._arrays: dict[tuple, str] = {}
        self._seconds: dict[int, str] = {}

    def _timestamp(self, ts: float) -> str:
        """COPY text of a UTC timestamp given in seconds since the epoch."""
        return self._timestamp_us(int(ts * 1e6))

    def encode(self, rows: list[tuple]) -> bytes:
        text, array, timestamp = self._text_field, self._array_field, self._timestamp
        lines = []
        for (ts, duration, wait, fp, kind, read, written, nrows, nbytes, sqlstate, database, username, app, addr,
             pid, xact, in_xact, protocol, cache_outcome, rewrite, score, proxy_id, params) in rows:
            lines.append("\t".join((
                timestamp(ts), str(duration), str(wait), text(fp), text(kind),
                array(read), array(written), "\\N" if nrows is None else str(nrows), str(nbytes),
                "\\N" if sqlstate is None else text(sqlstate), text(database), text(username), text(app),
                "\\N" if addr is None else text(addr), "\\N" if pid is None else str(pid),
                "\\N" if xact is None else str(xact), "\\N" if in_xact is None else ("t" if in_xact else "f"),
                text(protocol), text(cache_outcome), text(rewrite), "\\N" if score is None else repr(score),
                text(proxy_id), "\\N" if params is None else _array_literal(params).translate(_COPY_ESCAPES))))
        lines.append("")
        return "\n".join(lines).encode("utf-8", "replace")

    def _timestamp_us(self, us: int) -> str:
        """COPY text of a UTC timestamp given in whole microseconds since the epoch; the formatted second is
        reused by every row within it."""
        whole, micro = divmod(us, 1_000_000)
        prefix = self._seconds.get(whole)
        if prefix is None:
            if len(self._seconds) > 4096:
                self._seconds.clear()
            prefix = self._seconds[whole] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
        return f"{prefix}.{micro:06d}+00"

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


class GroupCopyEncoder:
    """query_event_groups rows (GROUP_COLUMNS) in COPY's binary format: a statement's and a session's fields are
    encoded once and reused, each per-statement array is one numpy pass (see proxy/copy_binary.py)."""

    def __init__(self, proxy_id: str):
        self._origin = copy_binary.text(proxy_id)
        self._tails: dict[tuple, bytes] = {}
        self._row_head = copy_binary.row_head(len(GROUP_COLUMNS))

    def encode(self, groups: "list[tuple[float, float, _Group]]") -> bytes:
        """COPY data (header to trailer) of one row per (earliest ts, latest ts, group)."""
        B = copy_binary
        NULL = B.NULL
        tails = self._tails
        parts = [B.HEADER]
        for first, _, g in groups:
            s = g.statement
            stmt = s.copy_fields
            if stmt is None:
                stmt = s.copy_fields = b"".join((B.text(s.fingerprint), B.text(s.kind),
                                                 B.text_array(s.tables_read), B.text_array(s.tables_written)))
            tail = tails.get((g.protocol, g.cache_outcome, g.rewrite))
            if tail is None:
                if len(tails) > 1000:
                    tails.clear()
                tail = tails[g.protocol, g.cache_outcome, g.rewrite] = b"".join(
                    B.text(v) for v in (g.protocol, g.cache_outcome, g.rewrite))
            base = int(first * 1e6)
            n = len(g.ts)
            sqlstate, params = g.sqlstate, g.params
            parts += (
                self._row_head, B.timestamp_us(base), stmt, g.session.copy_fields, tail, self._origin,
                B.offsets_array(g.ts, base), B.fixed_array(g.duration, B.OID_INT8),
                B.fixed_array(g.wait, B.OID_INT8) if any(g.wait) else NULL,
                B.fixed_array(g.rows, B.OID_INT8), B.fixed_array(g.bytes_out, B.OID_INT8),
                NULL if sqlstate.count(None) == n else B.text_array(sqlstate),
                B.fixed_array(g.pid, B.OID_INT4), B.fixed_array(g.xact, B.OID_INT8),
                B.fixed_array(g.in_xact, B.OID_BOOL), B.fixed_array(g.score, B.OID_FLOAT4),
                NULL if params.count(None) == n else B.text_array(
                    [None if p is None else _array_literal(p) for p in params]))
        parts.append(B.TRAILER)
        return b"".join(parts)


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
        self.proxy_id = proxy_id
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
        rows = batch.full_rows(self.proxy_id)
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
        # Sessions append records here; its tick analyses them (once, for the scorer too) and calls _take.
        self.feed = StatementFeed(self.analyzer, min(cfg.flush_interval, _FEED_INTERVAL))
        self.feed.query_log = self
        self._events: list = []                  # submit()ted events, counted, not yet taken by the feed
        # Analysed records, folded into groups as the feed hands them over, until the next batch is taken.
        self._open: dict[tuple, _Group] = {}
        self._closed: list[_Group] = []          # groups that reached _GROUP_MAX statements
        self._open_templates: dict[str, list] = {}
        self._open_events = 0                    # records folded into them
        self._queued = 0                         # records folded and in _events
        self._queue_size = cfg.queue_size
        self._batch_size = cfg.batch_size
        self._wakeup: asyncio.Future | None = None
        self.before_batch = None                 # called before a batch is taken from the queue, if set
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
        self._encoder = CopyTextEncoder()             # per-statement rows (spool replays)
        self._group_encoder = GroupCopyEncoder(proxy_id)
        self._closing = False         # stop(): the analyser drains the queue and ends
        self._store_closing = False   # stop(), once the analyser is done: the store task drains the outbox and ends
        self._tasks: list[asyncio.Task] = []
        self._drop_log_at = 0.0
        self._drops_unlogged = 0
        self._store_down = False

    # ---------------------------------------------------------------- the session's side

    def submit(self, event: QueryEvent) -> None:
        """Queue one event object; O(1), never blocks, never raises. (Sessions append records to `feed`.)"""
        try:
            self.submitted += 1
            if self._queued + len(self.feed.records) >= self._queue_size:
                self._settled += 1
                self._note_dropped(1, "queue full")
                return
            self._events.append(event)
            self._queued += 1
        except Exception:  # a log problem must never reach a client
            pass

    def _take_events(self) -> list[tuple]:
        """The submit()ted events as records (the feed's tick); a malformed one is dropped and counted here."""
        events, self._events = self._events, []
        self._queued -= len(events)
        records = []
        for ev in events:
            try:
                records.append(event_record(ev))
            except Exception:
                self._settled += 1
                self._note_dropped(1, "malformed event")
                log.debug("query log: malformed event dropped", exc_info=True)
        return records

    def _take(self, records: list[tuple], infos: list, scores, counted: int) -> None:
        """An analysed (and maybe scored) batch from the feed; the first `counted` records were submit()ted."""
        fresh = len(records) - counted
        self.submitted += fresh
        room = self._queue_size - self._queued
        if len(records) > room:
            # The store cannot keep up: the newest records go (event objects were bounded as they came).
            keep = max(room, counted)
            lost = len(records) - keep
            records, infos = records[:keep], infos[:keep]
            scores = scores[:keep] if scores is not None else None
            self._settled += lost
            self._note_dropped(lost, "queue full")
        if not records:
            return
        folded = self._fold(records, infos, scores)
        self._open_events += folded
        self._queued += folded
        if self._queued >= self._batch_size:
            self._wake()

    @property
    def queued(self) -> int:
        return self._queued + len(self.feed.records)

    def stats(self) -> dict[str, int]:
        return {
            "submitted": self.submitted + len(self.feed.records), "written": self.written, "spooled": self.spooled,
            "replayed": self.replayed, "dropped": self.dropped, "queued": self.queued,
            "spool_bytes": self._spool.bytes, "store_connected": int(self._conn is not None),
            "templates_known": len(self._known), "analysis_cache_entries": len(self.analyzer),
            "analysis_cache_hits": self.analyzer.hits, "analysis_cache_misses": self.analyzer.misses,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._spool.open()
        self.feed.start()
        self._tasks = [asyncio.get_running_loop().create_task(self._analyse_loop(), name="querylog-analyse"),
                       asyncio.get_running_loop().create_task(self._store_loop(), name="querylog-store")]
        log.info("query log: writing to %s as proxy %s", _redacted(self.store_dsn), self.proxy_id)

    async def stop(self) -> None:
        """Write what is queued (or spool it) within cfg.stop_timeout, then close."""
        if not self._tasks:
            return
        self.feed.tick()
        self.feed.stop()
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
        n = self._open_events + len(self._events) + len(self.feed.records)
        if n:
            self._open, self._closed, self._open_templates, self._open_events = {}, [], {}, 0
            self._events = []
            self.submitted += len(self.feed.records)
            self.feed.records.clear()
            self._queued = 0
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
        self.feed.tick()
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
            if not self._open_events:
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
            if self._open_events:
                if self.before_batch is not None:
                    try:
                        self.before_batch()
                    except Exception:   # someone else's hook must not stop the log
                        if time.monotonic() >= self._hook_log_at:
                            log.exception("query log: the before_batch hook failed")
                            self._hook_log_at = time.monotonic() + 60
                await self._hand_over(self._take_batch())

    def _take_batch(self) -> _Batch:
        """Everything folded so far, as one batch."""
        groups = self._closed
        groups.extend(self._open.values())
        batch = _Batch(None, self._open_templates, self._open_events, groups=groups)
        self._queued -= self._open_events
        self._open, self._closed, self._open_templates, self._open_events = {}, [], {}, 0
        return batch

    def _fold(self, records: list[tuple], infos: list, scores: list | None) -> int:
        """Add analysed records to their groups (statement, session, protocol, cache outcome, rewrite); returns
        how many were folded (the others are dropped and counted).

        The usual batch (every text analysed, one statement each, no parameter values to keep) is folded a
        column at a time: the records are transposed and each group takes its values with C-level gets and
        extends, with no Python code per record (a dozen appends and a stats call each, record by record).
        """
        if not self.cfg.parameters and None not in infos:
            stmts = list(map(_SINGLE, infos))
            if None not in stmts:
                try:
                    return self._fold_columns(records, stmts, scores)
                except Exception:   # an odd record: fold the batch one record at a time, which drops only it
                    log.debug("query log: batch refolded record by record", exc_info=True)
        return self._fold_each(records, infos, scores)

    def _fold_columns(self, records: list[tuple], stmts: list, scores: list | None) -> int:
        """_fold for records of single-statement texts, given those statements."""
        cols = list(zip(*records))
        if len(cols) != len(RECORD):
            raise ValueError("a record of the wrong length")
        own = cols[R_SCORE]
        if scores is None:
            score_col = own
        elif None in scores:
            score_col = [o if v is None else v for v, o in zip(scores, own)]
        else:
            score_col = scores
        # Each record's group number (a key's first record sets it), then the record numbers of each group, in
        # order: C-level maps and a sort, no Python code per record. Keys as _fold_each makes them.
        protocols = map(_PROTOCOL_OF.get, cols[R_STMT], itertools.repeat("simple"))
        index: dict[tuple, int] = {}
        number = list(map(index.setdefault, zip(stmts, cols[R_SESSION], protocols, cols[R_CACHE], cols[R_REWRITE]),
                          itertools.count()))
        if len(index) == 1:
            members = [(next(iter(index)), range(len(records)))]
        else:
            key_of = {v: k for k, v in index.items()}
            order = sorted(range(len(records)), key=number.__getitem__)
            members = [(key_of[n], list(at)) for n, at in itertools.groupby(order, number.__getitem__)]
        # Records come from sessions or from event_record, which coerces each field: nothing below raises on
        # their values, so a batch is never half folded.
        values = (cols[R_TS], cols[R_DURATION], cols[R_WAIT], cols[R_ROWS], cols[R_BYTES], cols[R_SQLSTATE],
                  cols[R_PID], cols[R_XACT], cols[R_IN_XACT], score_col)
        groups = self._open
        templates = self._open_templates
        known = self._known
        observe = self.query_stats.observe_many
        for key, at in members:
            if type(at) is range:
                taken = list(values)
            else:
                take = operator.itemgetter(*at) if len(at) > 1 else _single(at[0])
                taken = [take(c) for c in values]
            s = key[0]
            ts = taken[0]
            observe(s.fingerprint, s.normalized, s.kind, taken[1], taken[3], len(at) - taken[5].count(None))
            if s.fingerprint not in known:
                self._note_template(templates, s, None, None, min(ts), max(ts))
            g = groups.get(key)
            while taken[0]:
                if g is None:
                    g = groups[key] = _Group(s, key[1], key[2], key[3], key[4])
                room = _GROUP_MAX - len(g.ts)
                if len(taken[0]) < room:
                    g.extend(taken)
                    break
                g.extend([c[:room] for c in taken])
                taken = [c[room:] for c in taken]
                self._closed.append(groups.pop(key))
                g = None
        return len(records)

    def _fold_each(self, records: list[tuple], infos: list, scores: list | None) -> int:
        groups = self._open
        templates = self._open_templates
        known = self._known
        observe = self.query_stats.observe
        with_params = self.cfg.parameters
        folded = 0
        for i, rec in enumerate(records):
            info = infos[i]
            try:
                if info is None:
                    raise ValueError("no analysis")
                stmts = info.statements
                idx = rec[R_STMT]
                params = self._parameters(rec, info) if with_params else None
                score = scores[i] if scores is not None else None
                if len(stmts) == 1 or idx is not None:
                    if idx is not None and 0 <= idx < len(stmts):
                        s = stmts[idx]
                        if params is not None:
                            params = self._statement_params(params, stmts, idx, rec)
                    else:
                        s = info if len(stmts) > 1 else stmts[0]
                    (ts, duration, wait, _, nrows, nbytes, sqlstate, who, pid, xact, in_xact, _, _, cache_outcome,
                     rewrite, own_score) = rec
                    observe(s.fingerprint, s.normalized, s.kind, duration, nrows, sqlstate is not None)
                    protocol = "extended" if idx == -1 else "simple"
                    key = (s, who, protocol, cache_outcome, rewrite)
                    g = groups.get(key)
                    if g is None:
                        g = groups[key] = _Group(s, who, protocol, cache_outcome, rewrite)
                    g.add(ts, duration, wait, nrows, nbytes, sqlstate, pid, xact, in_xact,
                          own_score if score is None else score, params)
                    if len(g.ts) >= _GROUP_MAX:
                        self._closed.append(groups.pop(key))
                    if s.fingerprint not in known:
                        self._note_template(templates, s, rec, idx if len(stmts) > 1 else None, ts, ts)
                else:
                    self._split(rec, stmts, params, score, templates, observe)
                folded += 1
            except Exception:
                self._settled += 1
                self._note_dropped(1, "malformed event")
                log.debug("query log: malformed event dropped", exc_info=True)
        return folded

    def _split(self, rec: tuple, stmts: tuple[StatementInfo, ...], params, score, templates, observe) -> None:
        k = len(stmts)
        (ts, duration, wait, _, nrows, nbytes, sqlstate, who, pid, xact, in_xact, idx, _, cache_outcome,
         rewrite, own_score) = rec
        protocol = "extended" if idx == -1 else "simple"
        for i, s in enumerate(stmts):
            last = i == k - 1
            share = duration // k + (duration % k if last else 0)
            bshare = nbytes // k + (nbytes % k if last else 0)
            srows, ssqlstate = (nrows, sqlstate) if last else (None, None)
            observe(s.fingerprint, s.normalized, s.kind, share, srows, ssqlstate is not None)
            key = (s, who, protocol, cache_outcome, rewrite)
            g = self._open.get(key)
            if g is None:
                g = self._open[key] = _Group(s, who, protocol, cache_outcome, rewrite)
            g.add(ts, share, wait if i == 0 else 0, srows, bshare, ssqlstate, pid, xact, in_xact,
                  own_score if score is None else score, self._statement_params(params, stmts, i, rec))
            if len(g.ts) >= _GROUP_MAX:
                self._closed.append(self._open.pop(key))
            if s.fingerprint not in self._known:
                self._note_template(templates, s, rec, i, ts, ts)

    @staticmethod
    def _parameters(rec: tuple, info: StatementInfo) -> list[str | None] | None:
        params = rec[R_PARAMS]
        if params is not None:
            if type(params) is bytes:
                return bind_values(params)
            return [None if p is None else _clean_text(p) for p in params]
        if rec[R_STMT] != -1 and info.literal_count:
            sql = rec[R_SQL]
            text = sql if type(sql) is str else sql.decode("utf-8", "replace")
            return [_clean_text(v) for v in extract_literals(text)]
        return None

    @staticmethod
    def _statement_params(params, stmts: tuple[StatementInfo, ...], idx: int, rec: tuple):
        """A multi-statement text's extracted literals belong to its statements in order."""
        if params is None or len(stmts) == 1 or rec[R_PARAMS] is not None:
            return params
        start = sum(s.literal_count for s in stmts[:idx])
        return params[start:start + stmts[idx].literal_count] or None

    def _note_template(self, templates: dict, s: StatementInfo, rec: tuple | None, idx, first: float,
                       last: float) -> None:
        t = templates.get(s.fingerprint)
        if t is not None:
            t[5] = min(t[5], first)
            t[6] = max(t[6], last)
            return
        sample = None
        if self.cfg.parameters and rec is not None:
            sql = rec[R_SQL]
            sql = sql if type(sql) is str else sql.decode("utf-8", "replace")
            sample = sql if idx is None else _statement_text(sql, idx)
        templates[s.fingerprint] = [s.normalized, s.kind, list(s.tables_read), list(s.tables_written), sample,
                                    first, last]

    async def _hand_over(self, batch: _Batch) -> None:
        if not len(batch):
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
        n = len(batch)
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
                    self.written += len(batch)
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
                      len(batch), e, first_error)
            self._note_dropped(len(batch), "refused by the store")
            batch.clear()

    async def _write(self, batch: _Batch) -> None:
        conn = self._conn
        if conn is None:
            raise _TransientStoreError("not connected")
        rows = batch.rows
        grouped = batch.groups is not None
        if grouped:
            parts = [part for g in batch.groups for part in g.by_day()]   # (earliest ts, latest ts, group)
            days = {_day_of(first) for first, _, _ in parts}
        else:
            days = {_day_of(r[0]) for r in rows}
        missing = days - self._partitions
        if missing:
            expired = await self._create_partitions(missing)
            if expired:
                before = len(batch)
                if grouped:
                    parts = [p for p in parts if _day_of(p[0]) not in expired]
                    batch.groups = [g for _, _, g in parts]
                else:
                    batch.rows = rows = [r for r in rows if _day_of(r[0]) not in expired]
                self._note_dropped(before - len(batch), "older than retention_days")
        new = sorted((fp, t) for fp, t in batch.templates.items() if fp not in self._known)
        async with self._conn_lock:
            async with conn.transaction():
                if new:
                    await conn.executemany(_UPSERT_TEMPLATE, [
                        (fp, t[0], t[1], t[2], t[3], dt.datetime.fromtimestamp(t[5], _UTC),
                         dt.datetime.fromtimestamp(t[6], _UTC), t[4]) for fp, t in new])
                # Several COPYs of a bounded size, so encoding never holds the event loop for long. A memoryview:
                # asyncpg reads a file object in an executor thread, and takes bytes for a path.
                if grouped:
                    start = 0
                    while start < len(parts):
                        end, n = start, 0
                        while end < len(parts) and (n < _COPY_ROWS or end == start):
                            n += len(parts[end][2])
                            end += 1
                        data = self._group_encoder.encode(parts[start:end])
                        await conn.copy_to_table("query_event_groups", schema_name="pgpilot", columns=GROUP_COLUMNS,
                                                 source=memoryview(data), format="binary")
                        start = end
                else:
                    for start in range(0, len(rows), _COPY_ROWS):
                        data = self._encoder.encode(rows[start:start + _COPY_ROWS])
                        await conn.copy_to_table("query_event_rows", schema_name="pgpilot", columns=COLUMNS,
                                                 source=memoryview(data), format="text")
        self._known.update(fp for fp, _ in new)
        if len(self._known) > 200_000:
            self._known = {fp for fp, _ in new}
        seen = self._last_seen
        if grouped:
            for _, last, g in parts:
                fp = g.statement.fingerprint
                if last > seen.get(fp, 0.0):
                    seen[fp] = last
        else:
            for r in rows:
                if r[0] > seen.get(r[_FP], 0.0):
                    seen[r[_FP]] = r[0]

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
                self.written += len(batch)
                self.replayed += len(batch)
            replayed = True
        finally:
            self._spool.release(claim, replayed)
        if replayed and not self._spool.has_segments():
            log.info("query log spool replayed (%d rows so far)", self.replayed)
        return True

    async def _load_partitions(self, conn) -> set[int]:
        """The days with a partition of query_event_groups (partition_ddl creates the others' alongside)."""
        return {day for parent, _, day in await self._partition_list(conn) if parent == "query_event_groups"}

    @staticmethod
    async def _partition_list(conn) -> list[tuple[str, str, int]]:
        """(parent, partition, day) of every partition behind the query_events view."""
        out = []
        for rec in await conn.fetch(_PARTITIONS):
            m = _PARTITION_DAY.search(rec["relname"])
            if m:
                day = dt.datetime.strptime(m.group(1), "%Y%m%d").date()
                out.append((rec["parent"], rec["relname"], (day - _EPOCH).days))
        return out

    async def _create_partitions(self, days: set[int]) -> set[int]:
        """Create partitions for these days; returns the days too old to keep (their rows are dropped)."""
        cutoff = _today() - self.cfg.retention_days
        expired = {d for d in days if d < cutoff}
        async with self._conn_lock:
            for day in sorted(days - expired):
                for statement in logstore.partition_ddl(_date_of_day(day)):
                    try:
                        await self._conn.execute(statement)
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
            partitions = await self._partition_list(conn)
            self._partitions = {day for parent, _, day in partitions if parent == "query_event_groups"}
            for day, name in sorted((day, name) for _, name, day in partitions if day < cutoff):
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


def bind_values(raw: bytes) -> list[str | None] | None:
    """The parameter values of a Bind message: text-format values as text, binary ones as \\x and hex."""
    try:
        pos = raw.index(b"\0", 5) + 1          # portal name
        pos = raw.index(b"\0", pos) + 1        # statement name
        (nformats,) = _I16.unpack_from(raw, pos)
        formats = _I16S(nformats).unpack_from(raw, pos + 2) if nformats else ()
        pos += 2 + 2 * nformats
        (nparams,) = _I16.unpack_from(raw, pos)
        pos += 2
        values: list[str | None] = []
        for i in range(nparams):
            (size,) = _I32.unpack_from(raw, pos)
            pos += 4
            if size < 0:
                values.append(None)
                continue
            value = raw[pos:pos + size]
            pos += size
            binary = (formats[i] if nformats > 1 else formats[0]) if nformats else 0
            values.append("\\x" + value.hex() if binary else _clean_text(value))
        return values
    except (ValueError, IndexError, struct.error):
        return None


def _I16S(n: int) -> struct.Struct:
    return struct.Struct(f"!{n}h")


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


def _statement_text(sql: str, idx: int) -> str | None:
    from pglast import parser as pg_parser
    try:
        parts = pg_parser.split(sql, with_parser=False)
        return parts[idx] if 0 <= idx < len(parts) else None
    except Exception:
        return None


class _TemplateStats:
    __slots__ = ("fingerprint", "normalized", "kind", "calls", "total_us", "max_us", "rows", "errors", "samples",
                 "weight", "next_at")

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
        self.weight = 1.0              # algorithm L's state, once the reservoir is full
        self.next_at = 0               # the call number whose duration replaces a sample next


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
        self.observe_many(fingerprint, normalized, kind, (duration_us,), (rows,), 1 if failed else 0)

    def observe_many(self, fingerprint: str, normalized: str, kind: str, durations_us, rows, failed: int) -> None:
        """Statements of one template: their durations and row counts (None where unknown), how many failed."""
        t = self._templates.get(fingerprint)
        if t is None:
            if len(self._templates) >= self.max_templates + max(1, self.max_templates // 10):
                self._evict()
            t = self._templates[fingerprint] = _TemplateStats(fingerprint, normalized, kind)
        n = len(durations_us)
        before = t.calls
        t.calls += n
        t.total_us += sum(durations_us)
        longest = max(durations_us)
        if longest > t.max_us:
            t.max_us = longest
        t.rows += sum(filter(None, rows))
        t.errors += failed
        # A uniform reservoir of durations (Li's algorithm L): fill it, then replace a random sample at call
        # numbers drawn ahead, so a batch costs a few random draws, not one per statement.
        samples = t.samples
        size = self.reservoir_size
        i = 0
        if len(samples) < size:
            i = min(n, size - len(samples))
            samples.extend(durations_us[:i])
            if len(samples) < size:
                return
            t.weight = math.exp(math.log(self._uniform()) / size)
            t.next_at = before + i + self._skip(t.weight)
        end = t.calls
        while t.next_at <= end:
            samples[int(self._random() * size)] = durations_us[t.next_at - before - 1]
            t.weight *= math.exp(math.log(self._uniform()) / size)
            t.next_at += self._skip(t.weight)

    def _uniform(self) -> float:
        return self._random() or 1e-300          # in (0, 1): the logarithms above need it above 0

    def _skip(self, weight: float) -> int:
        """Calls until the next replacement (at least 1)."""
        if weight >= 1.0:
            return 1
        return int(math.log(self._uniform()) / math.log1p(-weight)) + 1

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
