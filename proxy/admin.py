"""The admin console: a virtual database (config.admin.database) that answers SHOW, RELOAD, PAUSE, KILL... over the wire.

Commands are a table from name to handler, as in PgBouncer's admin.c; other parts of the proxy add theirs with
`server.admin.register("SHOW CACHE", handler, "what it shows")`. A handler gets an AdminRequest and returns a
Result (a typed table), a command tag, or an awaitable of either; it raises AdminError to answer an error.
Answers use the simple query protocol with real type OIDs, so psql renders typed tables.
admin_users may run everything, stats_users only what is not admin_only (SHOW ...); others are refused.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Sequence

from proxy import protocol as P
from proxy.protocol import MessageSplitter, ProtocolError

if TYPE_CHECKING:
    from proxy.pool import Pool
    from proxy.server import ProxyServer
    from proxy.session import ClientSession

log = logging.getLogger("pgpilot.admin")

# Type OIDs of the columns the console answers with.
TEXT, INT8, FLOAT8, TIMESTAMPTZ, BOOL = 25, 20, 701, 1184, 16
_TYPLEN = {TEXT: -1, INT8: 8, FLOAT8: 8, TIMESTAMPTZ: 8, BOOL: 1}

_ALL_MESSAGES = frozenset(range(256))   # the console looks at every message whole
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|([^\s"]+)')
_SECRET_KEYS = ("password", "secret", "token")


class AdminError(Exception):
    """An ERROR answered to the console client; the session goes on."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.hint = hint
        self.detail = detail


@dataclass
class Result:
    """A table: (name, type OID) columns, rows of Python values (None is NULL), and the command tag."""

    columns: Sequence[tuple[str, int]]
    rows: Iterable[Sequence[Any]]
    tag: str = "SHOW"


@dataclass
class Command:
    name: str                   # upper case, e.g. "SHOW POOLS", "PAUSE"
    handler: Callable[["AdminRequest"], Any]
    summary: str
    usage: str
    admin_only: bool
    listed: bool = True         # shown in SHOW HELP and in the hint for unknown commands


@dataclass
class AdminRequest:
    """One console command as a handler sees it."""

    console: "AdminConsole"
    connection: "AdminConnection"
    args: list[str]

    @property
    def server(self) -> "ProxyServer":
        return self.console.server

    @property
    def session(self) -> "ClientSession":
        return self.connection.session


def client_state(c: "ClientSession") -> str:
    """starting, waiting (for a backend), active (has a backend or requests in flight) or idle."""
    if c.state != "ready":
        return "starting"
    if c.waiting:
        return "waiting"
    if c.backend is not None or c.pending:
        return "active"
    return "idle"


def server_state(pool: "Pool", be) -> str:
    if be in pool.lent:
        return "active"
    if be.state == "resetting":
        return "resetting"
    return "idle" if be.state == "idle" else be.state


def wall_time(monotonic_ts: float) -> float:
    """A time.monotonic() instant as a Unix time."""
    return time.time() - (time.monotonic() - monotonic_ts)


def redact(key: str, value: Any) -> Any:
    """Config values with secrets masked: password-like keys, and passwords inside URLs."""
    if value is None:
        return None
    if any(s in key.lower() for s in _SECRET_KEYS):
        return "********"
    if isinstance(value, str) and "://" in value:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1********@", value)
    return value


def flatten(doc: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key + "."))
        else:
            out.append((key, redact(key, v)))
    return out


# ------------------------------------------------------------------------------------------- wire encoding

def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, float):
        if value != value:
            return b"NaN"
        if value in (float("inf"), float("-inf")):
            return b"Infinity" if value > 0 else b"-Infinity"
        return repr(value).encode()
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ").replace("+00:00", "+00").encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple, dict)):
        import json
        return json.dumps(value).encode()
    return str(value).encode()


def _config_text(value: Any) -> str | None:
    """A config value as written in config.yaml."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return _text(value).decode()


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    body = [len(columns).to_bytes(2, "big")]
    for name, oid in columns:
        body.append(P.cstr(name) + (0).to_bytes(4, "big") + (0).to_bytes(2, "big") + oid.to_bytes(4, "big")
                    + _TYPLEN[oid].to_bytes(2, "big", signed=True) + (-1).to_bytes(4, "big", signed=True)
                    + (0).to_bytes(2, "big"))
    return P.message(P.B_ROW_DESCRIPTION, b"".join(body))


def data_row(values: Sequence[Any]) -> bytes:
    body = [len(values).to_bytes(2, "big")]
    for v in values:
        b = _text(v)
        if b is None:
            body.append((-1).to_bytes(4, "big", signed=True))
        else:
            body.append(len(b).to_bytes(4, "big") + b)
    return P.message(P.B_DATA_ROW, b"".join(body))


def encode_result(result: Result) -> bytes:
    out = [row_description(result.columns)]
    n = 0
    for row in result.rows:
        out.append(data_row(row))
        n += 1
    out.append(P.command_complete(f"{result.tag} {n}" if result.tag == "SELECT" else result.tag))
    return b"".join(out)


def split_statements(sql: str) -> list[str]:
    """Statements of a Query text: split at semicolons outside double quotes."""
    parts, cur, quoted = [], [], False
    for ch in sql:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def tokens(statement: str) -> list[str]:
    """Words of a command; "quoted" words keep their case and may hold spaces."""
    out = []
    for m in _TOKEN.finditer(statement):
        out.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2))
    return out


# ------------------------------------------------------------------------------------------- the console

class AdminConsole:
    """The command table and the handlers of the built-in commands."""

    def __init__(self, server: "ProxyServer"):
        self.server = server
        self.commands: dict[str, Command] = {}
        self._register_builtins()

    def register(self, name: str, handler: Callable[[AdminRequest], Any], summary: str, *,
                 usage: str | None = None, admin_only: bool | None = None, listed: bool = True) -> None:
        """Add (or replace) a command. SHOW commands default to stats-user access, others to admin only."""
        name = " ".join(name.upper().split())
        if admin_only is None:
            admin_only = not name.startswith("SHOW ")
        self.commands[name] = Command(name, handler, summary, usage or name, admin_only, listed)

    # ---------------------------------------------------------------- sessions

    def start(self, session: "ClientSession", params: dict[str, str]) -> None:
        """An authenticated client asked for the console database: check its role, greet it, take its input."""
        cfg = self.server.config.admin
        if session.user in cfg.admin_users:
            is_admin = True
        elif session.user in cfg.stats_users:
            is_admin = False
        else:
            session.fatal("28000", f'user "{session.user}" may not use the admin console "{cfg.database}"')
            return
        conn = AdminConnection(self, session, is_admin)
        session.admin = conn
        session.cancel_pid, session.cancel_secret = self.server.register_cancel_key(session)
        reported = {
            "server_version": self._server_version(), "server_encoding": "UTF8",
            "client_encoding": params.get("client_encoding", "UTF8"), "DateStyle": "ISO, MDY",
            "integer_datetimes": "on", "standard_conforming_strings": "on", "TimeZone": "UTC",
            "IntervalStyle": "postgres", "is_superuser": "off", "session_authorization": session.user,
            "application_name": params.get("application_name", ""),
        }
        out = [P.AUTH_OK]
        out.extend(P.parameter_status(k, v) for k, v in reported.items())
        out.append(P.backend_key_data(session.cancel_pid, session.cancel_secret))
        out.append(P.ready_for_query(b"I"))
        session._write(b"".join(out))
        session.state = "ready"
        log.info("admin console connection (%s)", "admin" if is_admin else "stats",
                 extra={"client": session.id, "user": session.user, "addr": session.client_addr})
        rest, session._startup_buf = session._startup_buf, b""
        if rest:
            conn.data_received(session, rest)

    def _server_version(self) -> str:
        for pool in self.server.pools.values():
            if pool.server_params and pool.server_params.get("server_version"):
                return pool.server_params["server_version"]
        return "15.0"

    def lookup(self, words: list[str]) -> tuple[Command, list[str]]:
        upper = [w.upper() for w in words]
        for n in (2, 1):
            cmd = self.commands.get(" ".join(upper[:n]))
            if cmd is not None and len(upper) >= n:
                return cmd, words[n:]
        raise AdminError("42601", f'unknown admin command "{" ".join(words)}"', hint=self.command_list())

    def command_list(self) -> str:
        shows = sorted(c.name[5:] for c in self.commands.values() if c.listed and c.name.startswith("SHOW "))
        others = [c.usage for c in self.commands.values() if c.listed and not c.name.startswith("SHOW ")]
        return f"commands: SHOW {'|'.join(shows)}; {'; '.join(others)}. SHOW HELP describes each."

    async def execute(self, conn: "AdminConnection", statement: str) -> bytes:
        words = tokens(statement)
        cmd, args = self.lookup(words)
        if cmd.admin_only and not conn.is_admin:
            raise AdminError("42501", f"permission denied: {cmd.name} needs an admin user "
                                      f"(admin.admin_users); {conn.session.user} may only run SHOW commands")
        result = cmd.handler(AdminRequest(self, conn, args))
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Result):
            return encode_result(result)
        return P.command_complete(result or cmd.name)

    # ---------------------------------------------------------------- built-in commands

    def _register_builtins(self) -> None:
        reg = self.register
        reg("SHOW HELP", self.show_help, "the console's commands")
        reg("SHOW VERSION", self.show_version, "pgpilot's version")
        reg("SHOW POOLS", self.show_pools, "per database: pool size, clients and backends by state, longest wait")
        reg("SHOW DATABASES", self.show_databases, "configured upstream databases")
        reg("SHOW CLIENTS", self.show_clients, "client connections")
        reg("SHOW SERVERS", self.show_servers, "backend connections")
        reg("SHOW STATS", self.show_stats, "per database and user: queries, errors, transactions, time, bytes")
        reg("SHOW CONFIG", self.show_config, "the configuration in force (secrets masked)")
        reg("SHOW QUERIES", self.show_queries, "query templates with the most total time (needs the query log)",
            usage="SHOW QUERIES [n] [total_time|calls|mean_time|p95_time|max_time|rows|errors]")
        reg("RELOAD", self.reload, "re-read the config file and apply it")
        reg("PAUSE", self.pause, "hold new transactions; returns once the pool's backends are idle",
            usage="PAUSE [db]")
        reg("RESUME", self.resume, "lift PAUSE", usage="RESUME [db]")
        reg("KILL", self.kill, "close a client connection (FATAL 57P01)", usage="KILL <client id>")
        reg("SHUTDOWN", self.shutdown, "stop the proxy gracefully, as SIGTERM does")
        reg("SET", lambda req: "SET", "accepted and ignored, for drivers that set parameters", admin_only=False,
            listed=False)

    def show_help(self, req: AdminRequest) -> Result:
        rows = [(c.usage, "admin" if c.admin_only else "stats", c.summary)
                for c in sorted(self.commands.values(), key=lambda c: c.name) if c.listed]
        return Result([("command", TEXT), ("access", TEXT), ("description", TEXT)], rows)

    def show_version(self, req: AdminRequest) -> Result:
        from pgpilot import __version__
        return Result([("version", TEXT)], [(f"pgpilot {__version__}",)])

    def _pool_rows(self) -> list[tuple[str, "Pool", str]]:
        server = self.server
        rows = [(name, pool, "paused" if pool.paused else "active") for name, pool in server.pools.items()]
        rows += [(name, pool, "removed") for name, pool in server.retired_pools.items()]
        return rows

    def show_pools(self, req: AdminRequest) -> Result:
        per_db: dict[str, dict[str, int]] = {}
        for c in self.server.clients:
            if c.admin is None:
                d = per_db.setdefault(c.database, {})
                st = client_state(c)
                d[st] = d.get(st, 0) + 1
        now = time.perf_counter()
        rows = []
        for name, pool, status in self._pool_rows():
            counts = pool.counts()
            cl = per_db.get(name, {})
            waits = [now - c.wait_started for c in pool.waiters if not c.closed and c.waiting]
            rows.append((name, self.server.config.pool_mode, pool.size, cl.get("active", 0), cl.get("idle", 0),
                         cl.get("waiting", 0), counts["active"], counts["idle"], counts["connecting"],
                         counts["total"] - counts["active"] - counts["idle"], counts["total"],
                         round(max(waits, default=0.0), 6), status))
        return Result([("database", TEXT), ("pool_mode", TEXT), ("pool_size", INT8), ("cl_active", INT8),
                       ("cl_idle", INT8), ("cl_waiting", INT8), ("sv_active", INT8), ("sv_idle", INT8),
                       ("sv_connecting", INT8), ("sv_resetting", INT8), ("sv_total", INT8),
                       ("maxwait_s", FLOAT8), ("status", TEXT)], rows)

    def show_databases(self, req: AdminRequest) -> Result:
        cfg = self.server.config
        rows = []
        for name, pool, status in self._pool_rows():
            db = pool.db
            clients = sum(1 for c in self.server.clients if c.database == name and c.admin is None)
            rows.append((name, db.host, db.port, db.dbname, db.user, pool.size, len(pool.all), clients,
                         cfg.max_client_conn_per_database or None, status))
        return Result([("name", TEXT), ("host", TEXT), ("port", INT8), ("dbname", TEXT), ("user", TEXT),
                       ("pool_size", INT8), ("server_connections", INT8), ("client_connections", INT8),
                       ("max_client_conn", INT8), ("status", TEXT)], rows)

    def show_clients(self, req: AdminRequest) -> Result:
        now = time.perf_counter()
        rows = []
        for c in sorted(self.server.clients, key=lambda c: c.id):
            rows.append((
                c.id, c.user or None, c.database or None, c.application_name or None, c.client_addr,
                dt.datetime.fromtimestamp(c.connected_at, dt.timezone.utc),
                "admin" if c.admin is not None else client_state(c), c.txn_status.decode(),
                c.backend.pid if c.backend is not None else None, c.pinned,
                round(now - c.wait_started, 6) if c.waiting else None, c.bytes_in, c.bytes_out))
        return Result([("id", INT8), ("user", TEXT), ("database", TEXT), ("application_name", TEXT),
                       ("addr", TEXT), ("connected_at", TIMESTAMPTZ), ("state", TEXT), ("txn_status", TEXT),
                       ("backend_pid", INT8), ("pinned", TEXT), ("wait_s", FLOAT8), ("bytes_in", INT8),
                       ("bytes_out", INT8)], rows)

    def show_servers(self, req: AdminRequest) -> Result:
        now = time.monotonic()
        rows = []
        for name, pool, _ in self._pool_rows():
            for be in sorted(pool.all, key=lambda b: b.id):
                state = server_state(pool, be)
                rows.append((name, be.pid, state, be.owner.id if be.owner is not None else None,
                             dt.datetime.fromtimestamp(wall_time(be.created), dt.timezone.utc),
                             round(now - be.last_used, 3) if state == "idle" else None, len(be.prepared)))
        return Result([("database", TEXT), ("pid", INT8), ("state", TEXT), ("client_id", INT8),
                       ("connected_at", TIMESTAMPTZ), ("idle_s", FLOAT8), ("prepared_statements", INT8)], rows)

    def show_stats(self, req: AdminRequest) -> Result:
        live = live_bytes(self.server)
        rows = []
        for key, t in sorted(self.server.stats.traffic.items()):
            b_in, b_out = live.get(key, (0, 0))
            rows.append((t.database, t.user, t.queries, t.query_errors, t.transactions,
                         round(t.query_us_total / 1e6, 6),
                         round(t.query_us_total / t.queries / 1000, 3) if t.queries else None,
                         t.bytes_in + b_in, t.bytes_out + b_out))
        return Result([("database", TEXT), ("user", TEXT), ("queries", INT8), ("query_errors", INT8),
                       ("transactions", INT8), ("query_time_s", FLOAT8), ("avg_query_ms", FLOAT8),
                       ("bytes_in", INT8), ("bytes_out", INT8)], rows)

    def show_config(self, req: AdminRequest) -> Result:
        from proxy.config import Config
        current = flatten(self.server.config.model_dump(mode="json"))
        defaults = dict(flatten(Config().model_dump(mode="json")))
        rows = [(k, _config_text(v), _config_text(defaults.get(k))) for k, v in current]
        return Result([("key", TEXT), ("value", TEXT), ("default", TEXT)], rows)

    def show_queries(self, req: AdminRequest) -> Result:
        from proxy.querylog import QueryStats
        qlog = self.server.query_log
        if qlog is None:
            raise AdminError("55000", "the query log is off, so there are no per-template statistics",
                             hint="set query_log.enabled: true and restart")
        n, by = 20, "total_time"
        for a in req.args:
            if a.isdigit():
                n = int(a)
            else:
                by = a.lower()
        if by not in QueryStats.ORDERS:
            raise AdminError("42601", f"unknown order {by!r}", hint=f"one of {', '.join(QueryStats.ORDERS)}")
        types = {"fingerprint": TEXT, "kind": TEXT, "calls": INT8, "total_ms": FLOAT8, "mean_ms": FLOAT8,
                 "predicted_ms": FLOAT8, "p95_ms": FLOAT8, "max_ms": FLOAT8, "rows": INT8, "errors": INT8,
                 "query": TEXT}
        top = qlog.query_stats.top(n, by)
        # the time model's prediction per template (proxy/served_models.py), beside the measured mean
        times = getattr(self.server.models, "times", None)
        for r in top:
            r["predicted_ms"] = times.predicted_for(r["fingerprint"], r["query"]) if times is not None else None
        columns = list(QueryStats.COLUMNS)
        columns.insert(columns.index("mean_ms") + 1, "predicted_ms")
        return Result([(c, types.get(c, TEXT)) for c in columns], [tuple(r[c] for c in columns) for r in top])

    def reload(self, req: AdminRequest) -> str:
        error = self.server.reload()
        if error is not None:
            raise AdminError("F0000", "the new configuration was rejected; the running one stays", detail=error)
        return "RELOAD"

    def _pools_named(self, args: list[str]) -> list["Pool"]:
        if not args:
            return list(self.server.pools.values())
        pool = self.server.pools.get(args[0])
        if pool is None:
            raise AdminError("3D000", f'database "{args[0]}" does not exist')
        return [pool]

    async def pause(self, req: AdminRequest) -> str:
        pools = self._pools_named(req.args)
        for pool in pools:
            pool.paused = True
        log.info("paused %s", ", ".join(p.name for p in pools), extra={"client": req.session.id})
        # Transactions in flight finish; PAUSE answers once their backends are back and idle.
        while any(pool.lent or len(pool.idle) != len(pool.all) for pool in pools):
            if req.session.closed or not all(p.paused for p in pools):
                break
            await asyncio.sleep(0.02)
        return "PAUSE"

    def resume(self, req: AdminRequest) -> str:
        pools = self._pools_named(req.args)
        for pool in pools:
            pool.resume()
        log.info("resumed %s", ", ".join(p.name for p in pools), extra={"client": req.session.id})
        return "RESUME"

    def kill(self, req: AdminRequest) -> str:
        if len(req.args) != 1 or not req.args[0].isdigit():
            raise AdminError("42601", "KILL needs one client id", hint="SHOW CLIENTS lists them")
        cid = int(req.args[0])
        target = next((c for c in self.server.clients if c.id == cid), None)
        if target is None:
            raise AdminError("42704", f"no client with id {cid}", hint="SHOW CLIENTS lists them")
        log.info("client %s killed from the admin console", cid, extra={"client": req.session.id})
        target.fatal("57P01", "terminating connection due to administrator command")
        return "KILL"

    def shutdown(self, req: AdminRequest) -> str:
        log.info("shutdown requested from the admin console", extra={"client": req.session.id})
        # After this command's answer has gone out.
        asyncio.get_running_loop().call_soon(self.server.request_shutdown, True)
        return "SHUTDOWN"


def live_bytes(server: "ProxyServer") -> dict[tuple[str, str], tuple[int, int]]:
    """Bytes of open sessions per (database, user): TrafficStats count them only at disconnect."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for c in server.clients:
        if c.traffic is not None:
            key = (c.database, c.user)
            b_in, b_out = out.get(key, (0, 0))
            out[key] = (b_in + c.bytes_in, b_out + c.bytes_out)
    return out


class AdminConnection:
    """One console client: its messages, answered in order by one task at a time."""

    def __init__(self, console: AdminConsole, session: "ClientSession", is_admin: bool):
        self.console = console
        self.session = session
        self.is_admin = is_admin
        self.splitter = MessageSplitter(_ALL_MESSAGES, console.server.config.max_message_bytes)
        self.inbox: deque[tuple[int, bytes]] = deque()
        self.skip_until_sync = False
        self._task: asyncio.Task | None = None

    def data_received(self, session: "ClientSession", data: bytes) -> None:
        try:
            items = self.splitter.feed(data)
        except ProtocolError as e:
            session.fatal("08P01", f"invalid frontend message: {e}")
            return
        self.inbox.extend(items)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        session = self.session
        while self.inbox and not session.closed:
            t, raw = self.inbox.popleft()
            if t == P.F_TERMINATE:
                session.close()
                return
            if t == P.F_QUERY:
                await self._query(raw[5:-1].decode("utf-8", "replace"))
            elif t == P.F_SYNC:
                self.skip_until_sync = False
                session._write(P.ready_for_query(b"I"))
            elif t in (P.F_PARSE, P.F_BIND, P.F_DESCRIBE, P.F_EXECUTE, P.F_CLOSE, P.F_FUNCTION_CALL):
                if not self.skip_until_sync:
                    self.skip_until_sync = True
                    session._write(P.error_response(
                        "0A000", "the admin console speaks the simple query protocol only"))
                if t == P.F_FUNCTION_CALL:
                    self.skip_until_sync = False
                    session._write(P.ready_for_query(b"I"))
            elif t not in (P.F_FLUSH, P.F_COPY_DATA, P.F_COPY_DONE, P.F_COPY_FAIL):
                session.fatal("08P01", f"invalid frontend message type {t}")
                return

    async def _query(self, sql: str) -> None:
        session = self.session
        statements = split_statements(sql)
        if not statements:
            session._write(P.message(P.B_EMPTY_QUERY) + P.ready_for_query(b"I"))
            return
        for statement in statements:
            try:
                answer = await self.console.execute(self, statement)
            except AdminError as e:
                answer = P.error_response(e.sqlstate, str(e), detail=e.detail, hint=e.hint)
                session._write(answer)
                break
            except Exception as e:  # a broken handler must not take the console down
                log.exception("admin command %r failed", statement, extra={"client": session.id})
                session._write(P.error_response("XX000", f"admin command failed: {e}"))
                break
            session._write(answer)
        session._write(P.ready_for_query(b"I"))
