"""A client connection's whole life: startup, then every message to and from its backend (the hot path).

Client messages are split by header and forwarded as they came, except where transaction pooling needs a
change: named prepared statements are renamed to per-pool server names and re-prepared on demand, session
settings are replayed when the client lands on a backend configured for someone else. Every request sent to
the backend is remembered in `pending`, in order, with what answers it; that queue is how the session knows
when a transaction ends, which answers to swallow (its own hidden requests), where to insert answers the
proxy gives itself (synthetic entries), and when each statement finished (for the query log).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import pglast.parser

from proxy import protocol as P
from proxy.effects import Effect, effects_of
from proxy.pool import BackendConnection, Pool, UpstreamError
from proxy.protocol import MessageSplitter, ProtocolError
from proxy.protocol import (  # message types as module constants: the hot path compares them per message
    B_COMMAND_COMPLETE, B_COPY_BOTH, B_COPY_IN, B_COPY_OUT, B_ERROR, B_FUNCTION_RESULT, B_NOTICE,
    B_NOTIFICATION, B_NO_DATA, B_PARAMETER_STATUS, B_PARAM_DESCRIPTION, B_READY, B_ROW_DESCRIPTION,
    F_BIND, F_CLOSE, F_COPY_DONE, F_COPY_FAIL, F_DESCRIBE, F_EXECUTE, F_FLUSH, F_FUNCTION_CALL, F_PARSE,
    F_QUERY, F_SYNC, F_TERMINATE
)
from proxy.querylog import ZERO_DIGITS, QueryEvent, session_info

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger("pgpilot.session")

CLIENT_WATCH = frozenset(b"QPBEDCSHXFcfp")   # all but CopyData, which streams through
_NOT_STATEFUL = ()
_TAG_UNSEEN = object()

# Startup parameters that are not session settings.
_STARTUP_ONLY = frozenset(("user", "database", "options", "replication"))
# Parameters the server reports with ParameterStatus, which the client must be told about at startup.
_REPORTED = ("application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
             "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding",
             "server_version", "session_authorization", "standard_conforming_strings", "TimeZone")
_REPORTED_LOWER = {n.lower(): n for n in _REPORTED}

_settings_intern: dict[tuple, tuple] = {}


class Pending:
    """One request sent to the backend, waiting for the message that completes it."""

    __slots__ = ("kind", "hidden", "synthetic", "sql", "start", "done", "effects", "server_name", "params")

    def __init__(self, kind: int, hidden: bool = False, synthetic: bytes | None = None, sql: bytes | None = None,
                 start: float = 0.0, effects: tuple = _NOT_STATEFUL, server_name: bytes | None = None):
        self.kind = kind
        self.hidden = hidden
        self.synthetic = synthetic      # bytes the proxy answers itself when this entry reaches the head
        self.sql = sql
        self.start = start
        self.done = 0                   # statements completed (multi-statement simple Query)
        self.effects = effects
        self.server_name = server_name  # a Parse's server-side statement name, forgotten if it fails
        self.params = None


# Settings that cannot change a result's bytes; every other setting is part of the cache context.
_RESULT_NEUTRAL_SETTINGS = frozenset((
    "application_name", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "work_mem", "maintenance_work_mem", "temp_buffers", "log_statement",
    "log_min_duration_statement", "synchronous_commit", "jit", "geqo", "random_page_cost", "seq_page_cost",
    "effective_cache_size", "enable_seqscan", "enable_indexscan", "enable_bitmapscan", "max_parallel_workers_per_gather",
    "plan_cache_mode", "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
    "default_transaction_isolation", "default_transaction_read_only", "fallback_application_name"))


class CacheRequest:
    """A read the result cache may answer: its key, what it reads, and how to answer from an entry."""

    __slots__ = ("kind", "sql", "key", "verdict", "tables", "nmsg", "prefix", "parse_raw", "token", "sent",
                 "explore")

    def __init__(self, kind: int, sql: bytes, key: bytes, verdict, nmsg: int, explore: bool, prefix: bytes = b"",
                 parse_raw: bytes | None = None):
        self.kind = kind            # F_QUERY or F_EXECUTE
        self.sql = sql
        self.key = key
        self.verdict = verdict      # the cache's Verdict: the tables read and the template's statistics
        self.tables = verdict.tables
        self.nmsg = nmsg            # client messages the request spans (Parse/Bind/Describe/Execute/Sync)
        self.prefix = prefix        # ParseComplete/BindComplete the client expects before the result
        self.parse_raw = parse_raw  # the batch's Parse, replayed on the session's books on a hit
        self.token = None           # generations read before the query ran: they key the fill
        self.sent = 0.0             # when the lookup started, then when the query went to Postgres
        self.explore = explore      # a declined template's occasional lookup, whose result is stored anyway


_BYPASS = object()   # the lookup said to go to Postgres without filling
_CACHE_BLIND_PINS = frozenset(("temporary table", "set_config()", "LOAD"))


_parse_checked: dict[bytes, bool] = {}


def _parses(raw: bytes) -> bool:
    """Whether a Parse message's query text is valid SQL syntax (pglast, cached per text)."""
    name_end = raw.index(b"\0", 5)
    sql = raw[name_end + 1:raw.index(b"\0", name_end + 1)]
    ok = _parse_checked.get(sql)
    if ok is None:
        try:
            pglast.parser.parse_sql_json(sql.decode("utf-8", "replace"))
            ok = True
        except Exception:
            ok = False
        if len(_parse_checked) >= 10_000:
            _parse_checked.clear()
        _parse_checked[sql] = ok
    return ok


class StatementNames:
    """Server-side names for prepared statements, shared by every client of a pool: one name per (query, types)."""

    def __init__(self, limit: int = 100_000):
        self._names: dict[bytes, bytes] = {}
        self._limit = limit
        self._counter = 0

    def name_for(self, key: bytes) -> bytes:
        name = self._names.get(key)
        if name is None:
            if len(self._names) >= self._limit:
                self._names.clear()  # backends keep the old names until they are recycled
            self._counter += 1
            name = b"pgpilot_%x" % self._counter
            self._names[key] = name
        return name


class ClientSession(asyncio.Protocol):
    """One client connection and, while it has one, its backend."""

    def __init__(self, server: "ProxyServer"):
        self.server = server
        self.config = server.config
        self.id = server.next_client_id()
        self.transport: asyncio.Transport | None = None
        self.state = "startup"
        self.closed = False
        self._startup_buf = b""
        self.splitter = MessageSplitter(CLIENT_WATCH, self.config.max_message_bytes, P.FRONTEND_TYPES)
        self.client_addr: str | None = None
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.pool: Pool | None = None
        self.backend: BackendConnection | None = None
        self.pending: deque[Pending] = deque()
        self.stash: list | None = None           # messages waiting for a backend
        self.skip_until_sync = False
        self.txn_status = b"I"
        self.transaction_mode = self.config.pool_mode == "transaction"
        self.pinned: str | None = None if self.transaction_mode else "session pool mode"
        self.stmts: dict[bytes, tuple[bytes, bytes, bytes]] = {}  # client name -> (server name, body, sql)
        self.unnamed: bytes | None = None        # body of the client's unnamed Parse (query + types)
        self.unnamed_sql: bytes | None = None
        self.portals: dict[bytes, bytes | None] = {}
        self.startup_settings: dict[str, str] = {}
        self.session_settings: dict[str, str] = {}   # lower-cased name -> SET statement text
        self.session_values: dict[str, str | None] = {}  # lower-cased name -> value, where a SET's value is plain
        self._setting_changes: list[Effect] = []
        self._rolled_back = False
        self.settings_key: tuple = ()
        self.reported: dict[str, str] = {}
        self.cancel_pid = 0
        self.cancel_secret = 0
        self.connected_at = time.time()
        self.last_activity = time.monotonic()
        self.busy_since = 0.0
        self.wait_started = 0.0
        self.waiting = False                     # queued in the pool for a backend
        self._wait_us = 0
        self.reading_paused_for: set[str] = set()
        self.bytes_in = 0
        self.bytes_out = 0
        self._bytes_mark = 0
        self.xact_id = 0
        self.query_log = server.query_log
        self.stats = server.stats
        self.traffic = None                      # TrafficStats of (database, user), set at startup
        self.cache = server.cache                # ResultCache, or None when caching is off
        self.guard = server.guard                # rejects statements inline (anomaly enforce mode), or None
        # Finished statements go to the query log and the scorer as one record each (querylog.RECORD).
        feed = server.query_log.feed if server.query_log is not None else getattr(server.scorer, "feed", None)
        self._record = feed.records.append if feed is not None else None
        # The scorer's inline lane (proxy.scoring): a statement in a range already known to score below the threshold
        # is counted as scored here instead of becoming a record. Only where the record would serve nothing else.
        scorer = server.scorer
        self._lane = scorer if scorer is not None and scorer.inline and feed is scorer.feed else None
        self._log_session = None                 # querylog.SessionInfo, set at startup
        self._log_binds: dict | None = {} if feed is not None and self.config.query_log.parameters else None
        self._cache_ctx = None                   # CacheContext for the current settings (built lazily)
        self._cache_req: CacheRequest | None = None   # a looked-up request whose reply should fill the cache
        self._capture: list | None = None        # reply messages being captured for a cache fill
        self._capture_bytes = 0
        self._capture_req: CacheRequest | None = None
        self.txn_writes: set | None = None       # tables written since the last ReadyForQuery 'I'
        self.hold: list | None = None            # replies held until the writes are recorded as invalidations
        self.admin = None                        # set when this is an admin console connection
        self._reader: asyncio.Future | None = None

    # ================================================================ asyncio.Protocol callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if isinstance(peer, tuple) else None
        if not self.server.admit(self):
            transport.write(P.error_response("53300", "sorry, too many clients already", "FATAL"))
            transport.close()
            self.closed = True

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.bytes_in += len(data)
        if self.state != "ready":
            self._startup_data(data)
            return
        if self.admin is not None:
            self.admin.data_received(self, data)
            return
        try:
            items = self.splitter.feed(data)
        except ProtocolError as e:
            self.fatal("08P01", f"invalid frontend message: {e}")
            return
        if self.stash is not None:
            self.stash.extend(items)
            if self.splitter.pending_bytes + len(data) > 65536:
                self._pause_reading("wait", True)   # a client pipelining a lot while it waits
        else:
            self._to_server(items, 0)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.state = "closed"
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)
        if self.traffic is not None:
            self.traffic.bytes_in += self.bytes_in
            self.traffic.bytes_out += self.bytes_out
        if self.waiting:
            self.waiting = False
            self.pool.cancel_wait(self)
        self._give_back_backend()
        self.server.forget(self)

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends: stop reading the backend.
        if self.backend is not None:
            self.backend.pause_reading(True)

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading(False)

    def backend_write_paused(self, paused: bool) -> None:
        self._pause_reading("backend", paused)

    def _pause_reading(self, reason: str, paused: bool) -> None:
        was = bool(self.reading_paused_for)
        if paused:
            self.reading_paused_for.add(reason)
        else:
            self.reading_paused_for.discard(reason)
        now = bool(self.reading_paused_for)
        if self.transport is not None and was != now and not self.closed:
            if now:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # ================================================================ startup

    def _startup_data(self, data: bytes) -> None:
        if self.state != "startup":
            self._startup_buf += data   # authentication answers, or pipelined before we answered
            if self._reader is not None and not self._reader.done():
                self._reader.set_result(None)
            return
        buf = self._startup_buf + data
        while len(buf) >= 4:
            length = P.unpack_i32(buf, 0)
            if length < 8 or length > P.MAX_STARTUP_PACKET:
                self.fatal("08P01", "invalid length of startup packet")
                return
            if len(buf) < length:
                break
            packet, buf = buf[4:length], buf[length:]
            try:
                code, params = P.parse_startup(packet)
            except ProtocolError as e:
                self.fatal("08P01", str(e))
                return
            if (code == P.SSL_REQUEST or code == P.GSSENC_REQUEST) and not self.encrypted:
                # Once encrypted, a second request is refused below as an unsupported protocol, as Postgres does.
                tls = self.server.auth.tls if code == P.SSL_REQUEST else None
                if tls is None:
                    self.transport.write(b"N")
                    continue
                if buf:
                    # Plaintext sent before the handshake must not pass as if it came encrypted (CVE-2021-23214).
                    self.fatal("08P01", "received unencrypted data after SSL request")
                    return
                self._startup_buf = b""
                self.state = "tls"
                self.transport.pause_reading()
                self.transport.write(b"S")
                asyncio.get_running_loop().create_task(self._start_tls(tls))
                return
            if code == P.CANCEL_REQUEST:
                try:
                    pid, secret = P.parse_cancel(packet)
                except ProtocolError as e:
                    self.fatal("08P01", str(e))
                    return
                self.server.cancel(pid, secret)
                self.close()
                return
            if code >> 16 != 3:
                self.fatal("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                    "server supports 3.0 to 3.0")
                return
            self._startup_buf = buf
            self.state = "starting"
            asyncio.get_running_loop().create_task(self._start_session(code, params))
            return
        self._startup_buf = buf

    async def _start_tls(self, tls) -> None:
        """Upgrade to TLS after answering an SSLRequest with 'S'; the startup packet then comes encrypted."""
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, tls.context, server_side=True, ssl_handshake_timeout=tls.handshake_timeout)
        except Exception as e:  # ssl.SSLError, a timeout, a client gone during the handshake
            log.info("client %s: TLS handshake failed: %s", self.id, e)
            self.close()
            if self.state != "closed":
                self.connection_lost(e)
            return
        if self.closed:
            transport.close()
            return
        transport.set_write_buffer_limits(high=256 * 1024)
        self.transport = transport
        self.state = "startup"
        self._startup_data(b"")

    @property
    def encrypted(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None

    async def read_startup_message(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """The next typed message from the client during startup (e.g. a PasswordMessage): (type, raw)."""
        while True:
            buf = self._startup_buf
            if len(buf) >= 5:
                length = P.unpack_i32(buf, 1)
                if length < 4 or length > P.MAX_STARTUP_PACKET:
                    raise ProtocolError("invalid message length during authentication")
                if len(buf) > length:
                    self._startup_buf = buf[length + 1:]
                    return buf[0], buf[:length + 1]
            if self.closed:
                raise ConnectionResetError("client disconnected during startup")
            self._reader = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._reader, timeout)
            self._reader = None

    async def _start_session(self, code: int, params: dict[str, str]) -> None:
        unrecognized = [k for k in params if k.startswith("_pq_.")]
        if code & 0xFFFF or unrecognized:
            self.transport.write(P.negotiate_protocol_version(0, unrecognized))
        user = params.get("user")
        if not user:
            self.fatal("28000", "no PostgreSQL user name specified in startup packet")
            return
        if params.get("replication", "false").lower() not in ("false", "0", "no", "off"):
            self.fatal("28000", "pgpilot does not carry replication connections")
            return
        database = params.get("database") or user
        self.user, self.database = user, database
        self.application_name = params.get("application_name", "")
        if self._record is not None:
            self._log_session = session_info(database, user, self.application_name, self.client_addr)
        is_admin = database == self.config.admin.database and self.server.admin is not None
        # As in Postgres, authentication comes first: an unknown database is not revealed to strangers.
        try:
            if not await self.server.authenticate(self, params):
                return
        except (ProtocolError, ConnectionError, asyncio.TimeoutError) as e:
            self.fatal("08P01", f"authentication exchange failed: {e}")
            return
        pool = self.server.pools.get(database)
        if pool is None and not is_admin:
            self.fatal("3D000", f'database "{database}" does not exist')
            return
        if not is_admin and not self.server.admit_user(self):
            return
        self.traffic = self.stats.traffic_for(database, user)
        if is_admin:
            self.server.admin.start(self, params)
            return
        self.pool = pool
        settings = {k: v for k, v in params.items() if k not in _STARTUP_ONLY and not k.startswith("_pq_.")}
        if params.get("options"):
            settings.update(P.parse_options(params["options"]))
        self.startup_settings = settings
        self._recompute_settings_key()
        try:
            server_params = await self.pool.ensure_server_params()
        except UpstreamError as e:
            self.fatal(e.sqlstate, str(e))
            return
        if self.closed:
            return
        reported = dict(server_params)
        for k, v in settings.items():
            name = _REPORTED_LOWER.get(k.lower())
            if name:
                reported[name] = v
        self.reported = reported
        self.cancel_pid, self.cancel_secret = self.server.register_cancel_key(self)
        out = [P.AUTH_OK]
        out.extend(P.parameter_status(k, v) for k, v in reported.items())
        out.append(P.backend_key_data(self.cancel_pid, self.cancel_secret))
        out.append(P.ready_for_query(b"I"))
        self.transport.write(b"".join(out))
        self.state = "ready"
        log.debug("client %s connected: user=%s database=%s addr=%s", self.id, user, database, self.client_addr)
        rest, self._startup_buf = self._startup_buf, b""
        if rest:
            self.data_received(rest)

    # ================================================================ client -> server

    def _to_server(self, items: list, i: int) -> None:
        """Forward client messages items[i:] to the backend, acquiring one first if needed."""
        try:
            self._forward(items, i)
        except ProtocolError as e:
            self.fatal("08P01", f"invalid frontend message: {e}")

    def _forward(self, items: list, i: int) -> None:
        be = self.backend
        pending = self.pending
        out: list = []          # bytes for the backend
        cout: list = []         # bytes the proxy answers the client with itself
        if not pending:
            self.busy_since = time.monotonic()
        n = len(items)
        while i < n:
            item = items[i]
            i += 1
            if type(item) is not tuple:
                # CopyData bytes streaming through.
                if not self.skip_until_sync and be is not None:
                    out.append(item)
                continue
            t, raw = item
            if self.skip_until_sync and t != F_SYNC and t != F_TERMINATE:
                continue
            if t == F_SYNC:
                self.skip_until_sync = False
                if be is None:
                    self._answer(P.ready_for_query(self.txn_status), cout)
                    continue
                out.append(raw)
                pending.append(Pending(t))
                continue
            if t == F_TERMINATE:
                self._flush(be, out, cout)
                self.close()
                return
            if t == F_FLUSH:
                if be is not None:
                    out.append(raw)
                continue
            if self.guard is not None and (t == F_QUERY or t == F_PARSE):
                reason = self.guard.check(raw)
                if reason is not None:
                    self._refuse(t, reason, be, out, cout)
                    if self.closed:
                        return
                    continue
            if (self.cache is not None and not pending and self.txn_status == b"I"
                    and (t == F_QUERY or t == F_BIND or t == F_PARSE)):
                if self._cache_req is None:
                    if self._try_cache(items, i - 1, be, out, cout):
                        return
            if be is None:
                if t == F_PARSE and raw[5] != 0 and _parses(raw):
                    # A named Parse of valid syntax outside a transaction is only remembered: it is prepared on
                    # whichever backend first needs it, so a synchronous prepare never waits for a busy pool.
                    # Text that does not parse goes to Postgres, which reports the error at Parse as usual.
                    self._parse_named(raw, None, cout)
                    continue
                self._flush(be, out, cout)
                self._acquire(items, i - 1)
                return
            if t == F_QUERY:
                P.check_query(raw)
                sql = raw[5:-1]
                effects = effects_of(sql)
                be.unnamed_key = None   # a simple Query destroys the unnamed statement
                if effects:
                    if self._query_effects_now(effects, raw, cout):
                        self._cache_req = None    # answered here: what the cache decided for it is spent
                        continue
                pending.append(Pending(t, sql=sql, start=time.perf_counter(), effects=effects))
                out.append(raw)
                if self.cache is not None:
                    self._cache_request_sent(sql)
            elif t == F_EXECUTE:
                portal, _ = P.read_cstring(raw, 5)
                sql = self.portals.get(portal)
                effects = effects_of(sql) if sql else _NOT_STATEFUL
                if effects:
                    self._pin_if_needed(effects)
                pending.append(Pending(t, sql=sql, start=time.perf_counter(), effects=effects))
                if self._log_binds is not None:
                    pending[-1].params = self._log_binds.get(portal)   # the values, for query_log.parameters
                out.append(raw)
                if self.cache is not None and sql is not None:
                    self._cache_request_sent(sql)
            elif t == F_BIND:
                portal, pos = P.read_cstring(raw, 5)
                stmt, pos2 = P.read_cstring(raw, pos)
                if self._log_binds is not None:
                    self._log_binds[portal] = raw
                if not stmt:
                    self._ensure_unnamed(be, out)
                    self.portals[portal] = self.unnamed_sql
                    out.append(raw)
                else:
                    entry = self.stmts.get(stmt)
                    if entry is None:
                        self.portals[portal] = None
                        out.append(raw)   # Postgres answers 26000 for the client's own name
                    else:
                        server_name = self._ensure_prepared(be, entry, out)
                        out.append(P.message(F_BIND, portal + b"\0" + server_name + b"\0" + raw[pos2:]))
                        self.portals[portal] = entry[2]
                pending.append(Pending(t))
            elif t == F_PARSE:
                P.check_parse(raw)
                if raw[5] != 0:
                    self._parse_named(raw, be, cout, out)
                else:
                    body = raw[6:]
                    self.unnamed, self.unnamed_sql = body, P.read_cstring(body, 0)[0]
                    be.unnamed_key = body
                    pending.append(Pending(t))
                    out.append(raw)
            elif t == F_DESCRIBE:
                what = raw[5]
                name, _ = P.read_cstring(raw, 6)
                if what == 0x53:  # 'S'
                    if not name:
                        self._ensure_unnamed(be, out)
                        out.append(raw)
                    else:
                        entry = self.stmts.get(name)
                        if entry is None:
                            out.append(raw)
                        else:
                            server_name = self._ensure_prepared(be, entry, out)
                            out.append(P.message(F_DESCRIBE, b"S" + server_name + b"\0"))
                else:
                    out.append(raw)
                pending.append(Pending(t))
            elif t == F_CLOSE:
                what = raw[5]
                name, _ = P.read_cstring(raw, 6)
                if what == 0x53 and name:
                    # The server-side statement stays prepared for other clients of the pool.
                    self.stmts.pop(name, None)
                    self._answer(P.CLOSE_COMPLETE, cout)
                else:
                    if what != 0x53:
                        self.portals.pop(name, None)
                        if self._log_binds is not None:
                            self._log_binds.pop(name, None)
                    pending.append(Pending(t))
                    out.append(raw)
            elif t == F_COPY_DONE or t == F_COPY_FAIL:
                out.append(raw)
            elif t == F_FUNCTION_CALL:
                pending.append(Pending(t, start=time.perf_counter()))
                out.append(raw)
            else:
                self._flush(be, out, cout)
                self.fatal("08P01", f"invalid frontend message type {t}")
                return
        self._flush(be, out, cout)

    @property
    def pool_names(self) -> StatementNames:
        return self.server.statement_names

    def _flush(self, be: BackendConnection | None, out: list, cout: list) -> None:
        if out and be is not None and not be.closed:
            be.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if cout:
            self._write(b"".join(cout))

    def _answer(self, msg: bytes, cout: list) -> None:
        """An answer the proxy gives itself, in its place in the response stream."""
        if self.pending:
            self.pending.append(Pending(0, synthetic=msg))
        else:
            cout.append(msg)

    def _synthetic_error(self, sqlstate: str, msg: str, cout: list) -> None:
        self._answer(P.error_response(sqlstate, msg), cout)
        self.skip_until_sync = True

    def _parse_named(self, raw: bytes, be: BackendConnection | None, cout: list, out: list | None = None) -> None:
        P.check_parse(raw)
        name, pos = P.read_cstring(raw, 5)
        body = raw[pos:]
        if name in self.stmts:
            self._synthetic_error("42P05", f'prepared statement "{name.decode(errors="replace")}" already exists', cout)
            return
        server_name = self.pool_names.name_for(body)
        self.stmts[name] = (server_name, body, P.read_cstring(body, 0)[0])
        if be is None or server_name in be.prepared:
            self._answer(P.PARSE_COMPLETE, cout)
        else:
            be.prepared.add(server_name)
            entry = Pending(F_PARSE, server_name=server_name)
            entry.params = name     # forgotten again if Postgres refuses the Parse
            self.pending.append(entry)
            out.append(P.parse(server_name, body))

    def _ensure_prepared(self, be: BackendConnection, entry: tuple, out: list) -> bytes:
        server_name, body, _ = entry
        if server_name not in be.prepared:
            be.prepared.add(server_name)
            self.pending.append(Pending(F_PARSE, hidden=True, server_name=server_name))
            out.append(P.parse(server_name, body))
        return server_name

    def _ensure_unnamed(self, be: BackendConnection, out: list) -> None:
        if self.unnamed is not None and be.unnamed_key != self.unnamed:
            be.unnamed_key = self.unnamed
            self.pending.append(Pending(F_PARSE, hidden=True))
            out.append(P.parse(b"", self.unnamed))

    def _refuse(self, t: int, reason: str, be, out: list, cout: list) -> None:
        """A statement the guard rejects never reaches Postgres; inside a transaction the client is closed,
        since Postgres would have aborted the transaction and we cannot make it do so."""
        self.stats.count_error("42501")
        if self.txn_status != b"I" or self.pending:
            self._flush(be, out, cout)
            out.clear()
            cout.clear()
            self.fatal("42501", f"pgpilot refused the statement: {reason}")
            return
        if t == F_QUERY:
            self._answer(P.error_response("42501", f"pgpilot refused the statement: {reason}"), cout)
            self._answer(P.ready_for_query(b"I"), cout)
        else:
            self._synthetic_error("42501", f"pgpilot refused the statement: {reason}", cout)

    def _pin_if_needed(self, effects: tuple) -> None:
        for e in effects:
            if e.kind == Effect.PIN:
                if e.name in _CACHE_BLIND_PINS:
                    # The cache cannot see this state (a temp table shadowing a shared one, settings changed by
                    # set_config, a loaded library): this session's results never go to or come from it.
                    self.cache = None
                if self.pinned is None:
                    self.pinned = e.name
                    log.debug("client %s pinned to backend %s: %s", self.id,
                              self.backend.pid if self.backend else None, e.name)

    def _query_effects_now(self, effects: tuple, raw: bytes, cout: list) -> bool:
        """Effects acted on when a simple Query is sent; True if the proxy answered it itself."""
        self._pin_if_needed(effects)
        if len(effects) == 1 and effects[0].kind == Effect.DEALLOCATE:
            e = effects[0]
            target = e.name.encode() if e.name else None
            if target is None or target in self.stmts:
                # The client's protocol-level statements live under other names on the server.
                if target is None:
                    self.stmts.clear()
                else:
                    del self.stmts[target]
                tag = "DEALLOCATE ALL" if target is None else "DEALLOCATE"
                sql = raw[5:-1]
                if sql.count(b";") <= 1:
                    self._answer(P.command_complete(tag), cout)
                    self._answer(P.ready_for_query(self.txn_status), cout)
                    return True
        return False

    # ================================================================ result cache

    @property
    def cache_ctx(self):
        ctx = self._cache_ctx
        if ctx is None:
            from proxy.cache import CacheContext
            values: dict[str, str] = {}
            for k, v in self.startup_settings.items():
                values[k.lower()] = v
            for k, v in self.session_settings.items():
                values[k] = self.session_values.get(k) or v
            role = values.get("role") or values.get("session_authorization") or self.pool.db.user
            settings = {k: v for k, v in values.items() if k not in _RESULT_NEUTRAL_SETTINGS}
            ctx = self._cache_ctx = CacheContext(self.database, role, settings)
        return ctx

    def _try_cache(self, items: list, start: int, be, out: list, cout: list) -> bool:
        """If items[start:] begins a cacheable read, look it up (asynchronously) and return True."""
        cache = self.cache
        ctx = self.cache_ctx
        t, raw = items[start]
        if t == F_QUERY:
            sql = raw[5:-1]
            v = cache.classify(sql, ctx)
            if not v.cacheable:
                self._cache_req = _BYPASS     # decided (and counted): not again once a backend is attached
                return False
            explore = cache.admission_turn(v)
            if explore is None:
                self._cache_req = _BYPASS     # not admitted: to Postgres, and not looked at again on the way
                return False
            key = cache.key(ctx, sql, b"S")
            if not key:
                self._cache_req = _BYPASS
                return False
            req = CacheRequest(F_QUERY, sql, key, v, 1, explore)
        else:
            req = self._extended_cache_request(items, start, ctx)
            if req is None:
                return False
        req.sent = time.perf_counter()
        if cache.lookup_soon(req.key, req.tables, self._cache_answered, req, req.verdict, req.explore) is not None:
            # No lookup now (Redis slow or down...): to Postgres without a fill. Marked, so that forwarding
            # the request once a backend is attached does not decide (and count) it again.
            self._cache_req = _BYPASS
            return False
        self._flush(be, out, cout)
        out.clear()
        cout.clear()
        self.stash = items[start:]
        return True

    def _extended_cache_request(self, items: list, start: int, ctx) -> CacheRequest | None:
        """A batch [Parse] Bind [Describe portal] Execute(all rows) Sync, as one cacheable request."""
        n = len(items)
        j = start
        parse_raw = None
        parsed_name = parsed_body = None
        if items[j][0] == F_PARSE:
            parse_raw = items[j][1]
            parsed_name, pos = P.read_cstring(parse_raw, 5)
            parsed_body = parse_raw[pos:]
            if parsed_name and parsed_name in self.stmts:
                return None
            j += 1
        if j >= n or type(items[j]) is not tuple or items[j][0] != F_BIND:
            return None
        bind = items[j][1]
        portal, pos = P.read_cstring(bind, 5)
        stmt, pos2 = P.read_cstring(bind, pos)
        if parse_raw is not None and stmt == parsed_name:
            body = parsed_body
        elif not stmt:
            body = self.unnamed
        else:
            entry = self.stmts.get(stmt)
            body = entry[1] if entry else None
        if body is None:
            return None
        sql, types_at = P.read_cstring(body, 0)
        j += 1
        describe = False
        if j < n and type(items[j]) is tuple and items[j][0] == F_DESCRIBE:
            d = items[j][1]
            if d[5] != 0x50 or P.read_cstring(d, 6)[0] != portal:   # only Describe of this portal
                return None
            describe = True
            j += 1
        if j >= n or type(items[j]) is not tuple or items[j][0] != F_EXECUTE:
            return None
        ex = items[j][1]
        ex_portal, pos = P.read_cstring(ex, 5)
        if ex_portal != portal or P.unpack_i32(ex, pos) != 0:
            return None
        j += 1
        if j >= n or type(items[j]) is not tuple or items[j][0] != F_SYNC:
            return None
        j += 1
        v = self.cache.classify(sql, ctx)
        if not v.cacheable:
            self._cache_req = _BYPASS
            return None
        explore = self.cache.admission_turn(v)
        if explore is None:
            self._cache_req = _BYPASS
            return None
        # The parameter types are part of the key: the same bytes mean another value under another type.
        key = self.cache.key(ctx, sql, (b"E1" if describe else b"E0") + bind[pos2:], body[types_at:])
        if not key:
            self._cache_req = _BYPASS
            return None
        prefix = (P.PARSE_COMPLETE if parse_raw is not None else b"") + P.BIND_COMPLETE
        return CacheRequest(F_EXECUTE, sql, key, v, j - start, explore, prefix, parse_raw)

    def _cache_answered(self, req: CacheRequest, entry: bytes | None, token) -> None:
        """The lookup's answer: reply from the entry, or send the stashed messages to Postgres."""
        if self.closed:
            return
        stash, self.stash = self.stash or [], None
        if entry is not None:
            if req.parse_raw is not None:
                name, pos = P.read_cstring(req.parse_raw, 5)
                body = req.parse_raw[pos:]
                if name:
                    self.stmts[name] = (self.pool_names.name_for(body), body, req.sql)
                else:
                    self.unnamed, self.unnamed_sql = body, req.sql
            self._write(req.prefix + entry + P.ready_for_query(b"I"))
            self._served_from_cache(req, entry, req.sent)
            rest = stash[req.nmsg:]
        else:
            req.token = token
            self._cache_req = req if token is not None else _BYPASS
            rest = stash
        if self.reading_paused_for:
            self._pause_reading("wait", False)
        if rest:
            self._to_server(rest, 0)
        if self.stash is None:          # else the request waits for a backend and is sent when one attaches
            self._cache_req = None

    def _served_from_cache(self, req: CacheRequest, entry: bytes, t0: float) -> None:
        now = time.perf_counter()
        duration_us = int((now - t0) * 1e6)
        self.traffic.statement(duration_us, None)
        self.traffic.transactions += 1
        if self.query_log is not None:
            self.query_log.submit(QueryEvent(
                ts=time.time() - (now - t0), duration_us=duration_us, wait_us=0,
                sql=req.sql.decode("utf-8", "replace"), rows=P.command_tag_rows(entry[entry.rfind(b"C"):]),
                bytes_out=len(entry), sqlstate=None, database=self.database, username=self.user,
                application_name=self.application_name, client_addr=self.client_addr, backend_pid=None,
                xact_id=self.server.next_xact_id(), in_transaction=False,
                protocol="simple" if req.kind == F_QUERY else "extended", cache_outcome="hit"))

    def _cache_request_sent(self, sql: bytes) -> None:
        """A Query/Execute goes to Postgres: start capturing its reply if it was a cache miss; note its writes."""
        req = self._cache_req
        if req is not None:
            self._cache_req = None
            if req is not _BYPASS and req.sql == sql:
                req.sent = time.perf_counter()
                self._capture = []
                self._capture_bytes = 0
                self._capture_req = req
        writes = self.cache.writes(sql, self.cache_ctx)
        if writes:
            if self.txn_writes is None:
                self.txn_writes = set(writes)
            else:
                self.txn_writes.update(writes)

    def _capture_add(self, item: bytes) -> list | None:
        cap = self._capture
        cap.append(item)
        self._capture_bytes += len(item)
        if self._capture_bytes > self.config.cache.max_entry_bytes:
            self._capture = cap = None
        return cap

    def _capture_done(self, cc: bytes) -> None:
        cap, self._capture = self._capture, None
        cap.append(cc)
        req, self._capture_req = self._capture_req, None
        exec_us = int((time.perf_counter() - req.sent) * 1e6)
        self.cache.fill(req.key, req.tables, req.token, b"".join(cap), exec_us, verdict=req.verdict)
        return None

    async def _record_writes(self, writes: set) -> None:
        """Release the held replies once the tables written are recorded as invalidated."""
        try:
            await self.cache.invalidate(tuple(writes))
        finally:
            hold, self.hold = self.hold, None
            if hold and not self.closed:
                self._write(b"".join(hold))
            if self.backend is not None:
                self._maybe_release(self.backend)

    # ================================================================ backends

    def _acquire(self, items: list, i: int) -> None:
        self.stash = items[i:] if i else items
        be = self.pool.acquire_nowait()
        if be is not None:
            self._wait_us = 0
            self.attach_backend(be)
            return
        # No timer per wait: the server's once-a-second sweep enforces query_wait.
        self.wait_started = time.perf_counter()
        self.waiting = True
        self.pool.wait(self)

    def attach_backend(self, be: BackendConnection) -> None:
        """The pool lends us a backend: replay our settings if it has someone else's, then send what waited."""
        if self.waiting:
            self.waiting = False
            self._wait_us = int((time.perf_counter() - self.wait_started) * 1e6)
            self.stats.record_wait(self._wait_us)
            self.pool.stats["wait_us_total"] += self._wait_us
        self.backend = be
        be.owner = self
        self.xact_id = self.server.next_xact_id()
        if be.settings_key != self.settings_key:
            self.pending.append(Pending(F_QUERY, hidden=True))
            be.transport.write(P.query(self._settings_sql()))
            be.settings_key = self.settings_key
        stash, self.stash = self.stash, None
        if self.reading_paused_for:
            self._pause_reading("wait", False)
        if stash:
            self._to_server(stash, 0)

    def wait_timed_out(self) -> None:
        self.waiting = False
        self.pool.cancel_wait(self)
        self.stats.wait_timeouts += 1
        self._fail_stash("53300", f"pgpilot: no server connection for database \"{self.database}\" became free "
                                  f"within query_wait timeout ({self.config.timeouts.query_wait:g}s)")

    def acquire_failed(self, err: UpstreamError) -> None:
        self.waiting = False
        self._fail_stash(err.sqlstate, f"pgpilot: {err}")

    def _fail_stash(self, sqlstate: str, msg: str) -> None:
        """Answer the waiting request with an error, as Postgres would, and carry on with the session."""
        stash, self.stash = self.stash or [], None
        self._cache_req = None
        self._pause_reading("wait", False)
        if self.closed:
            return
        self._write(P.error_response(sqlstate, msg))
        first = stash[0] if stash else None
        if type(first) is tuple and first[0] in (F_QUERY, F_FUNCTION_CALL):
            self._write(P.ready_for_query(self.txn_status))
            rest = stash[1:]
        else:
            self.skip_until_sync = True
            rest = stash
        if rest:
            self._to_server(rest, 0)

    def _give_back_backend(self) -> None:
        be, self.backend = self.backend, None
        if be is None:
            return
        be.owner = None
        if be.closed:
            return
        if self.pending:
            be.close()      # a request is in flight: cheaper to drop the backend than to drain it
            return
        queries = []
        if self.txn_status != b"I":
            queries.append("ROLLBACK")
        if self.pinned is not None:
            queries.append(self.config.reset_query)
        if queries:
            self.pool.lent.discard(be)
            be.reset_and_release(queries)
        else:
            self.pool.release(be)

    def backend_lost(self, be: BackendConnection, exc) -> None:
        if self.backend is not be:
            return
        self.backend = None
        self.pending.clear()
        self.fatal("08006", "pgpilot: lost the server connection while it was in use" +
                   (f": {exc}" if exc else ""))

    # ================================================================ server -> client

    def server_data(self, data: bytes) -> None:
        be = self.backend
        try:
            items = be.splitter.feed(data)
        except ProtocolError as e:
            be.close()
            self.fatal("08P01", f"pgpilot: invalid message from the server: {e}")
            return
        pending = self.pending
        out: list = []
        hold_from = None
        capture = self._capture
        for item in items:
            if type(item) is not tuple:
                # DataRows, CopyData, notices, notifications: straight through.
                if not (pending and pending[0].hidden):
                    out.append(item)
                    if capture is not None:
                        capture = self._capture_add(item)
                continue
            t, raw = item
            if t == B_READY:
                e = pending.popleft() if pending else None
                status = raw[5:6]
                self._ready_for_query(status)
                if e is None or not e.hidden:
                    if status == b"I" and self.txn_writes and hold_from is None and self.hold is None:
                        hold_from = len(out)
                    out.append(raw)
                    if status == b"I":
                        self.traffic.transactions += 1
            elif t == B_COMMAND_COMPLETE:
                e = pending[0] if pending else None
                if e is None:
                    out.append(raw)
                    continue
                if self._setting_changes and raw[5:13] == b"ROLLBACK":
                    self._rolled_back = True
                if self.txn_writes and raw[5:11] == b"COMMIT" and hold_from is None and self.hold is None:
                    hold_from = len(out)   # committed: readers may fill from here on, record the writes first
                if capture is not None and not e.hidden:
                    capture = self._capture_done(raw)
                if e.kind == F_QUERY:
                    if e.hidden:
                        continue
                    if e.effects:
                        self._statement_effects(e, e.done, raw)
                    self._statement_done(e, raw, None, out)
                    e.done += 1
                else:
                    pending.popleft()
                    if e.effects:
                        self._statement_effects(e, 0, raw)
                    self._statement_done(e, raw, None, out)
                out.append(raw)
            elif t == B_ERROR:
                if raw[6:11] in (b"FATAL", b"PANIC"):
                    f = P.parse_error_fields(raw)
                    self._write(b"".join(out))
                    self.backend = None
                    self.pending.clear()
                    be.owner = None
                    be.close()
                    code = f.get("C", "08006")
                    self.fatal(code if code.startswith("08") else "08006",
                               f"pgpilot: the server closed the connection: {f.get('M', '')} (SQLSTATE {code})")
                    return
                e = pending[0] if pending else None
                if capture is not None:
                    capture = self._capture = None
                if self._setting_changes:
                    # An error rolls back the (implicit or explicit) transaction the SETs were made in.
                    self._rolled_back = True
                if e is None:
                    out.append(raw)
                    continue
                if e.kind == F_QUERY or e.kind == F_FUNCTION_CALL:
                    if e.hidden:
                        log.warning("client %s: replaying session settings failed: %s", self.id,
                                    P.parse_error_fields(raw).get("M"))
                        continue
                    self._statement_done(e, None, P.error_sqlstate(raw), out)
                    e.done += 1
                    out.append(raw)
                    continue
                # Extended protocol: the server skips everything up to the next Sync. The statement that failed
                # is the Execute, or, when a Parse or Bind failed, the first Execute the error skipped.
                pending.popleft()
                failed = e if e.kind == F_EXECUTE else None
                self._parse_failed(be, e)
                while pending and pending[0].kind != F_SYNC:
                    skipped = pending.popleft()
                    if failed is None and skipped.kind == F_EXECUTE:
                        failed = skipped
                    self._parse_failed(be, skipped)
                if failed is not None:
                    self._statement_done(failed, None, P.error_sqlstate(raw), out)
                out.append(raw)
            elif t == B_PARAMETER_STATUS:
                name, pos = P.read_cstring(raw, 5)
                value, _ = P.read_cstring(raw, pos)
                key, val = name.decode(), value.decode()
                if self.reported.get(key) != val:
                    self.reported[key] = val
                    out.append(raw)
                elif not (pending and pending[0].hidden):
                    out.append(raw)
            elif t == B_ROW_DESCRIPTION:
                e = pending[0] if pending else None
                if e is not None and e.kind == F_DESCRIBE:
                    pending.popleft()
                if e is None or not e.hidden:
                    out.append(raw)
                    if capture is not None:
                        capture = self._capture_add(raw)
            elif t == B_NOTICE or t == B_NOTIFICATION:
                # Forwarded as they come, never part of a cached result.
                if not (pending and pending[0].hidden):
                    out.append(raw)
            elif t == B_PARAM_DESCRIPTION or t == B_COPY_IN or t == B_COPY_OUT or t == B_COPY_BOTH \
                    or t == B_FUNCTION_RESULT:
                if not (pending and pending[0].hidden):
                    out.append(raw)
            else:
                # ParseComplete, BindComplete, CloseComplete, NoData, PortalSuspended, EmptyQueryResponse.
                e = pending[0] if pending else None
                if e is None:
                    out.append(raw)
                    continue
                if e.kind == F_QUERY:         # EmptyQueryResponse inside a simple Query
                    if not e.hidden:
                        out.append(raw)
                    continue
                pending.popleft()
                if not e.hidden:
                    out.append(raw)
                    if capture is not None and t == B_NO_DATA:
                        capture = self._capture_add(raw)
                    if e.kind == F_EXECUTE:
                        self._statement_done(e, None, None, out)
            # Answers the proxy gives itself go out once everything before them has.
            while pending and pending[0].synthetic is not None:
                out.append(pending.popleft().synthetic)
        if self.hold is not None:
            self.hold.extend(out)
            return
        if hold_from is not None:
            if hold_from:
                self._write(b"".join(out[:hold_from]))
            self.hold = out[hold_from:]
            writes, self.txn_writes = self.txn_writes, None
            asyncio.get_running_loop().create_task(self._record_writes(writes))
            return
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0])
        self._maybe_release(be)

    def _maybe_release(self, be: BackendConnection) -> None:
        if (self.txn_status == b"I" and not self.pending and self.pinned is None and self.stash is None
                and self.backend is be and be is not None and not self.closed and self.hold is None):
            self.backend = None
            be.owner = None
            self.pool.release(be)

    def _parse_failed(self, be: BackendConnection, e: Pending) -> None:
        """A Parse that failed, or was skipped after an error, prepared nothing: forget its names."""
        if e.server_name is not None:
            be.prepared.discard(e.server_name)
            if e.params is not None and self.stmts.get(e.params, (None,))[0] == e.server_name:
                del self.stmts[e.params]

    def _ready_for_query(self, status: bytes) -> None:
        self.txn_status = status
        if self._setting_changes and status == b"I":
            changes, self._setting_changes = self._setting_changes, []
            if not self._rolled_back:
                for e in changes:
                    self._commit_setting(e)
                self._recompute_settings_key()
                if self.backend is not None:
                    self.backend.settings_key = self.settings_key if self._backend_settings_known else None
            self._rolled_back = False
            self._backend_settings_known = True
        elif status == b"E" and self._setting_changes:
            self._rolled_back = True

    _backend_settings_known = True

    def _statement_effects(self, e: Pending, index: int, raw: bytes) -> None:
        for eff in e.effects:
            if eff.index != index:
                continue
            kind = eff.kind
            if kind == Effect.SET or kind == Effect.RESET or kind == Effect.RESET_ALL:
                self._setting_changes.append(eff)
                if kind != Effect.SET:
                    # Postgres resets to the backend's own defaults, not this client's startup values.
                    self._backend_settings_known = False
            elif kind == Effect.DISCARD_ALL:
                self._setting_changes.append(eff)
                self._backend_settings_known = False
                self.stmts.clear()
                if self.backend is not None:
                    self.backend.prepared.clear()
                    self.backend.unnamed_key = None
            elif kind == Effect.DEALLOCATE and eff.name is None and self.backend is not None:
                self.backend.prepared.clear()
        if self._setting_changes and raw[5:13] == b"ROLLBACK":
            self._rolled_back = True

    def _commit_setting(self, e: Effect) -> None:
        if e.kind == Effect.SET:
            name = e.name.lower()
            self.session_settings[name] = e.text
            self.session_values[name] = e.value
        elif e.kind == Effect.RESET:
            self.session_settings.pop((e.name or "").lower(), None)
            self.session_values.pop((e.name or "").lower(), None)
        else:
            self.session_settings.clear()
            self.session_values.clear()

    def _recompute_settings_key(self) -> None:
        key = tuple(sorted(self.startup_settings.items())) + tuple(self.session_settings.items())
        self.settings_key = _settings_intern.setdefault(key, key)
        self._cache_ctx = None

    def _settings_sql(self) -> str:
        # RESET ALL leaves role and session_authorization alone (GUC_NO_RESET_ALL): reset them first.
        parts = ["SET SESSION AUTHORIZATION DEFAULT", "RESET ROLE", "RESET ALL"]
        for k, v in sorted(self.startup_settings.items()):
            parts.append('SET "%s" TO \'%s\'' % (k.replace('"', '""'), v.replace("'", "''")))
        parts.extend(self.session_settings.values())
        return ";\n".join(parts)

    # ================================================================ query log

    def _statement_done(self, e: Pending, cc: bytes | None, sqlstate: str | None, out: list) -> None:
        """A statement finished (CommandComplete, ErrorResponse, PortalSuspended): count it, log it."""
        now = time.perf_counter()
        start = e.start
        e.start = now   # the next statement of a multi-statement Query starts here
        duration_us = int((now - start) * 1e6)
        self.traffic.statement(duration_us, sqlstate)
        record = self._record
        if record is None or e.sql is None:
            return
        sent = self.bytes_out + sum(map(len, out))
        nbytes, self._bytes_mark = sent - self._bytes_mark, sent
        wait_us, self._wait_us = self._wait_us, 0
        rows = P.known_tag_rows(cc, _TAG_UNSEEN) if cc else None
        if rows is _TAG_UNSEEN:
            rows = P.command_tag_rows(cc)
        lane = self._lane
        if lane is not None:
            who = self._log_session
            if sqlstate is not None:
                who.errors.quiet_after = start + lane.lane_window
            elif start > who.errors.quiet_after:
                sizes = (who.lane_q.get(e.sql.translate(ZERO_DIGITS)) if e.kind == F_QUERY
                         else who.lane_x.get(e.sql))
                if sizes is not None:
                    known = sizes.get(nbytes)
                    if known is not None and known[0] <= duration_us <= known[1] and known[2] == rows:
                        lane.lane_hits += 1
                        return
        # One tuple in querylog.RECORD order, appended to a list: the feed analyses, scores and logs in batches.
        record((time.time() - (now - start), duration_us, wait_us, e.sql, rows, nbytes, sqlstate, self._log_session,
                self.backend.pid if self.backend else None, self.xact_id, self.txn_status != b"I",
                e.done if e.kind == F_QUERY else -1, e.params, None, None, None))

    # ================================================================ helpers

    def _write(self, data: bytes) -> None:
        if not self.closed and data:
            self.bytes_out += len(data)
            self.transport.write(data)

    def fatal(self, sqlstate: str, msg: str) -> None:
        """Send a FATAL error and close this client only."""
        if not self.closed and self.transport is not None:
            self.stats.count_error(sqlstate)
            log.info("closed with FATAL %s: %s", sqlstate, msg, extra={
                "client": self.id, "backend": self.backend.pid if self.backend else None, "sqlstate": sqlstate})
            self.transport.write(P.error_response(sqlstate, msg, "FATAL"))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    def cancel_running(self) -> None:
        """A CancelRequest for us: cancel on our backend, or stop waiting for one."""
        be = self.backend
        if be is not None and self.pending:
            self.server.send_cancel(be)
        elif self.waiting:
            self.waiting = False
            self.pool.cancel_wait(self)
            self._fail_stash("57014", "canceling statement due to user request")
