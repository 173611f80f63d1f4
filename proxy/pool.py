"""Backend connections to the upstream PostgreSQL and the pools that lend them to client sessions.

A backend is idle (on its pool's idle list), lent (owned by one client session, which drives it), being reset
(running the reset query after a session-level use), or closed. The pool hands backends over synchronously:
a released backend goes straight to the longest-waiting client, so no task is created per transaction.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import scramp

from proxy import protocol as P
from proxy.protocol import MessageSplitter, ProtocolError
from proxy.tls import open_upstream

if TYPE_CHECKING:
    from proxy.config import Database
    from proxy.session import ClientSession

log = logging.getLogger("pgpilot.pool")

# Everything but DataRow and CopyData is looked at.
BACKEND_WATCH = frozenset(b"RKSZ123CTtnsIEGHWvVNA")


class UpstreamError(Exception):
    """The upstream could not be reached or refused us; carries the SQLSTATE to report."""

    def __init__(self, message: str, sqlstate: str = "08006"):
        super().__init__(message)
        self.sqlstate = sqlstate


class BackendConnection(asyncio.Protocol):
    """One server connection. While lent, its bytes go straight to the owning session."""

    _next_id = 0

    def __init__(self, pool: "Pool"):
        BackendConnection._next_id += 1
        self.id = BackendConnection._next_id
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.splitter = MessageSplitter(BACKEND_WATCH)
        self.owner: ClientSession | None = None
        self.pid = 0
        self.secret = 0
        self.server_params: dict[str, str] = {}
        self.prepared: set[bytes] = set()         # server-side statement names prepared here
        self.unnamed_key: object = None            # whose unnamed statement this backend holds
        self.settings_key: tuple | None = ()       # session settings applied (None: unknown, replay)
        self.created = time.monotonic()
        self.last_used = self.created
        self.closed = False
        self.reading_paused = False
        self._ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._scram: scramp.ScramClient | None = None
        self._resets_pending = 0                   # ReadyForQuery still expected from a reset
        self.state = "connecting"

    # -------------------------------------------------------------------- asyncio.Protocol callbacks

    def connection_made(self, transport):
        self.transport = transport
        db = self.pool.db
        transport.write(P.startup_message({"user": db.user, "database": db.dbname}))

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.server_data(data)
        elif self.state == "connecting":
            self._startup_data(data)
        else:
            self._idle_data(data)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self._ready.done():
            self._ready.set_exception(UpstreamError(f"server closed the connection during startup"))
        owner = self.owner
        if owner is not None:
            owner.backend_lost(self, exc)
        self.pool.forget(self)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.backend_write_paused(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.backend_write_paused(False)

    # -------------------------------------------------------------------- startup and authentication

    def _startup_data(self, data: bytes) -> None:
        try:
            items = self.splitter.feed(data)
            for item in items:
                if type(item) is tuple:
                    self._startup_message(item[0], item[1])
        except (ProtocolError, UpstreamError, scramp.ScramException, ValueError) as e:
            if not self._ready.done():
                err = e if isinstance(e, UpstreamError) else UpstreamError(f"authentication with the server failed: {e}", "08006")
                self._ready.set_exception(err)
            self.close()

    def _startup_message(self, t: int, raw: bytes) -> None:
        db = self.pool.db
        if t == P.B_AUTH:
            code = P.unpack_i32(raw, 5)
            if code == 0:
                return
            if code == 3:
                self.transport.write(P.password_message(P.cstr(self._password())))
            elif code == 5:
                salt = raw[9:13]
                inner = hashlib.md5((self._password() + db.user).encode()).hexdigest()
                outer = hashlib.md5(inner.encode() + salt).hexdigest()
                self.transport.write(P.password_message(P.cstr("md5" + outer)))
            elif code == 10:
                mechanisms = [m.decode() for m in raw[9:].split(b"\0") if m]
                if "SCRAM-SHA-256" not in mechanisms:
                    raise UpstreamError(f"server offers no supported SASL mechanism: {mechanisms}", "28000")
                self._scram = scramp.ScramClient(["SCRAM-SHA-256"], db.user, self._password())
                first = self._scram.get_client_first().encode()
                self.transport.write(P.sasl_initial_response("SCRAM-SHA-256", first))
            elif code == 11:
                self._scram.set_server_first(raw[9:].decode())
                self.transport.write(P.password_message(self._scram.get_client_final().encode()))
            elif code == 12:
                self._scram.set_server_final(raw[9:].decode())
            else:
                raise UpstreamError(f"server asks for an unsupported authentication method (code {code})", "28000")
        elif t == P.B_PARAMETER_STATUS:
            name, pos = P.read_cstring(raw, 5)
            value, _ = P.read_cstring(raw, pos)
            self.server_params[name.decode()] = value.decode()
        elif t == P.B_KEY_DATA:
            self.pid = P.unpack_i32(raw, 5) & 0xFFFFFFFF
            self.secret = P.unpack_i32(raw, 9) & 0xFFFFFFFF
        elif t == P.B_READY:
            self.state = "idle"
            if not self._ready.done():
                self._ready.set_result(self)
        elif t == P.B_ERROR:
            f = P.parse_error_fields(raw)
            raise UpstreamError(f"server refused the connection: {f.get('M', '')}", f.get("C", "08006"))

    def _password(self) -> str:
        pw = self.pool.db.password
        if pw is None:
            raise UpstreamError("server asks for a password but none is configured for this database", "28P01")
        return pw

    # -------------------------------------------------------------------- idle and reset

    def _idle_data(self, data: bytes) -> None:
        """Messages while nobody owns us: reset-query answers, or the server saying goodbye."""
        try:
            items = self.splitter.feed(data)
        except ProtocolError:
            self.close()
            return
        for item in items:
            if type(item) is not tuple:
                continue
            t, raw = item
            if t == P.B_READY and self._resets_pending:
                self._resets_pending -= 1
                if self._resets_pending == 0:
                    self.state = "idle"
                    self.pool.release(self)
            elif t == P.B_ERROR:
                f = P.parse_error_fields(raw)
                if f.get("S") in ("FATAL", "PANIC"):
                    log.info("backend %s closed by the server: %s", self.pid, f.get("M"))
                    self.close()
                    return
                if self._resets_pending:
                    log.warning("reset on backend %s failed: %s", self.pid, f.get("M"))
                    self.broken = True

    broken = False

    def reset_and_release(self, queries: list[str]) -> None:
        """Run the reset queries (answers swallowed here), then go back to the pool."""
        self.owner = None
        self.state = "resetting"
        self.prepared.clear()
        self.unnamed_key = None
        self.settings_key = ()
        self._resets_pending = len(queries)
        self.transport.write(b"".join(P.query(q) for q in queries))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                try:
                    self.transport.write(P.TERMINATE)
                except Exception:
                    pass
                self.transport.close()
        self.pool.forget(self)

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or self.closed or paused == self.reading_paused:
            return
        self.reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()


class Pool:
    """The backends of one upstream database, and the clients waiting for one."""

    def __init__(self, name: str, db: "Database", size: int, timeouts, max_prepared: int = 2000):
        self.name = name
        self.db = db
        self.size = size
        self.timeouts = timeouts
        self.max_prepared = max_prepared
        self.idle: deque[BackendConnection] = deque()
        self.lent: set[BackendConnection] = set()
        self.all: set[BackendConnection] = set()
        self.connecting = 0
        self.waiters: deque = deque()   # ClientSession objects, oldest first
        self.server_params: dict[str, str] | None = None
        self.paused = False
        self.stats = {"connects": 0, "connect_failures": 0, "wait_count": 0, "wait_us_total": 0}
        self.last_connect_error: UpstreamError | None = None

    # -------------------------------------------------------------------- lending

    def acquire_nowait(self) -> BackendConnection | None:
        if self.paused:
            return None
        idle = self.idle
        while idle:
            be = idle.pop()           # most recently used: warm caches, lets the rest time out
            if be.closed:
                continue
            self.lent.add(be)
            return be
        return None

    def wait(self, client: "ClientSession") -> None:
        """Queue a client; it gets client.attach_backend(be) or client.acquire_failed(err) later."""
        self.waiters.append(client)
        self.stats["wait_count"] += 1
        if not self.paused and len(self.all) + self.connecting < self.size:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect_for_waiters())

    def cancel_wait(self, client: "ClientSession") -> None:
        try:
            self.waiters.remove(client)
        except ValueError:
            pass

    def release(self, be: BackendConnection) -> None:
        self.lent.discard(be)
        if be.closed:
            self.forget(be)
            return
        be.owner = None
        be.pause_reading(False)
        now = time.monotonic()
        be.last_used = now
        lifetime = self.timeouts.server_lifetime
        if be.broken or len(be.prepared) > self.max_prepared or (lifetime and now - be.created > lifetime) \
                or len(self.all) > self.size:
            be.close()
            self._refill()
            return
        if be.state == "resetting":
            return
        while self.waiters and not self.paused:
            client = self.waiters.popleft()
            if client.closed:
                continue
            self.lent.add(be)
            client.attach_backend(be)
            return
        self.idle.append(be)

    def forget(self, be: BackendConnection) -> None:
        if be in self.all:
            self.all.discard(be)
            self.lent.discard(be)
            try:
                self.idle.remove(be)
            except ValueError:
                pass
            self._refill()

    def _refill(self) -> None:
        """Open backends for waiting clients when there is room."""
        live_waiters = sum(1 for c in self.waiters if not c.closed)
        while not self.paused and live_waiters > self.connecting and len(self.all) + self.connecting < self.size:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect_for_waiters())

    async def _connect_for_waiters(self) -> None:
        try:
            be = await self.connect()
        except UpstreamError as err:
            self.connecting -= 1
            if not self.all and self.connecting == 0:
                # Nothing is lent that could come back: tell every waiting client now rather than at timeout.
                waiters, self.waiters = self.waiters, deque()
                for client in waiters:
                    if not client.closed:
                        client.acquire_failed(err)
            return
        self.connecting -= 1
        self.release(be)

    async def connect(self) -> BackendConnection:
        """Open and authenticate one backend; raises UpstreamError."""
        db = self.db
        try:
            try:
                be = await self._open(db)
            except UpstreamError as e:
                # libpq's sslmode=allow: TLS only when the server refuses plaintext (hostssl rules).
                if db.sslmode != "allow" or e.sqlstate != "28000":
                    raise
                be = await self._open(db, encrypt=True)
        except UpstreamError as e:
            self.stats["connect_failures"] += 1
            self.last_connect_error = e
            log.warning("backend connection to %s failed: %s", self.name, e)
            raise
        except (OSError, asyncio.TimeoutError) as e:
            self.stats["connect_failures"] += 1
            reason = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
            err = UpstreamError(f"could not connect to server {db.host}:{db.port} for database \"{self.name}\": {reason}")
            self.last_connect_error = err
            log.warning("%s", err)
            raise err from None
        self.stats["connects"] += 1
        if self.server_params is None:
            self.server_params = dict(be.server_params)
        self.all.add(be)
        self.last_connect_error = None
        return be

    async def _open(self, db: "Database", encrypt: bool | None = None) -> BackendConnection:
        """Connect (negotiating TLS as db.sslmode says) and wait for the server's first ReadyForQuery."""
        _, be = await asyncio.wait_for(open_upstream(lambda: BackendConnection(self), db, encrypt),
                                       self.timeouts.connect)
        be.transport.set_write_buffer_limits(high=256 * 1024)
        await asyncio.wait_for(asyncio.shield(be._ready), self.timeouts.connect)
        return be

    async def ensure_server_params(self) -> dict[str, str]:
        """The upstream's startup ParameterStatus values; also proves the upstream is reachable.

        With no live backend, one is opened first (shared by clients starting at the same moment), so a
        client connecting while the upstream is down is refused at once with 08006, as Postgres would be.
        """
        if self.server_params is not None and (self.all or self.connecting):
            return self.server_params
        probe = self._probe
        if probe is None:
            probe = self._probe = asyncio.get_running_loop().create_task(self._open_one())
            probe.add_done_callback(self._probe_done)
        await asyncio.shield(probe)
        return self.server_params

    _probe: asyncio.Task | None = None

    def _probe_done(self, task: asyncio.Task) -> None:
        self._probe = None
        if not task.cancelled():
            task.exception()   # retrieved here; each waiting client re-raises it from its own await

    async def _open_one(self) -> None:
        self.connecting += 1
        try:
            be = await self.connect()
        finally:
            self.connecting -= 1
        self.release(be)

    # -------------------------------------------------------------------- housekeeping

    def close_idle_older_than(self, idle_timeout: float, now: float) -> None:
        if not idle_timeout:
            return
        for be in [b for b in self.idle if now - b.last_used > idle_timeout]:
            be.close()

    def close_all(self) -> None:
        for be in list(self.all):
            be.close()

    def counts(self) -> dict[str, int]:
        return {"idle": len(self.idle), "active": len(self.lent), "total": len(self.all),
                "connecting": self.connecting, "waiting": sum(1 for c in self.waiters if not c.closed)}

    # -------------------------------------------------------------------- run-time changes (admin console, reload)

    def resume(self) -> None:
        """Lift a pause: idle backends go to the waiting clients, and backends are opened for the rest."""
        self.paused = False
        while self.waiters and self.idle:
            self.release(self.idle.pop())
        self._refill()

    def resize(self, size: int) -> None:
        """A new pool size: extra idle backends close now, lent ones when released; waiters get new ones."""
        self.size = size
        while len(self.all) > size and self.idle:
            self.idle.popleft().close()
        self._refill()
