"""A small pipelined Redis (RESP2) client for the cache's hot path: one connection, many commands in flight.

Replies come back in order, so every batch of commands waits as one future in a FIFO. A batch that outlives
its deadline fails with TimeoutError at once, but keeps its place in the FIFO until its late replies arrive
and are dropped, so a slow reply never shifts the stream; a connection whose oldest batch is overdue by far
is closed. `ReplyParser` is sans-IO (bytes in, replies out) and tested on its own.

Why not redis-py: on this project's 2-core machines its asyncio client costs 250-650 us of CPU per command
against ~50 us for a bare protocol round trip (bench.cache_redis), and a lookup happens for every cacheable
read. The admin side (pub/sub, setup) uses the same connection type, so there is one Redis code path.
"""
from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from typing import Callable
from urllib.parse import unquote, urlparse


class RespError(Exception):
    """An error reply (-ERR ...) from Redis; returned inside reply lists, raised by `call`."""


class RespProtocolError(Exception):
    """Bytes that are not RESP2."""


class _Incomplete(Exception):
    pass


def encode_command(args) -> bytes:
    """One command as a RESP array of bulk strings (str is UTF-8 encoded, int and float are written out)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if type(a) is str:
            a = a.encode()
        elif type(a) is int or type(a) is float:
            a = str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def _parse(buf: bytearray, pos: int):
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    t = buf[pos]
    if t == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        start = end + 2
        stop = start + n
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[start:stop]), stop + 2
    if t == 42:  # * array
        n = int(buf[pos + 1:end])
        pos = end + 2
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            v, pos = _parse(buf, pos)
            items.append(v)
        return items, pos
    if t == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if t == 43:  # + simple string
        return bytes(buf[pos + 1:end]), end + 2
    if t == 45:  # - error
        return RespError(buf[pos + 1:end].decode("utf-8", "replace")), end + 2
    raise RespProtocolError(f"unexpected RESP type byte {t!r}")


class ReplyParser:
    """Incremental RESP2 reply parser: feed bytes, get the complete replies so far."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        replies = []
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                v, pos = _parse(buf, pos)
                replies.append(v)
        except _Incomplete:
            pass
        if pos:
            del buf[:pos]
        return replies

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


class _Batch:
    __slots__ = ("future", "count", "replies", "deadline")

    def __init__(self, future: asyncio.Future, count: int, deadline: float):
        self.future = future
        self.count = count
        self.replies: list = []
        self.deadline = deadline


class RedisConnection(asyncio.Protocol):
    """One Redis connection with pipelining; `on_push` receives pub/sub messages once subscribed."""

    def __init__(self, timeout: float, stall_timeout: float | None = None,
                 on_push: Callable[[list], None] | None = None, on_lost: Callable[[], None] | None = None):
        self.timeout = timeout
        self.stall_timeout = stall_timeout if stall_timeout is not None else max(1.0, 20 * timeout)
        self.on_push = on_push
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = True
        self._parser = ReplyParser()
        self._fifo: deque[_Batch] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.closed = False

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except (RespProtocolError, ValueError) as e:
            self._fail_all(ConnectionError(f"redis: bad reply: {e}"))
            self.close()
            return
        fifo = self._fifo
        for r in replies:
            if not fifo:
                if self.on_push is not None:
                    self.on_push(r)
                continue
            b = fifo[0]
            b.replies.append(r)
            if len(b.replies) == b.count:
                fifo.popleft()
                if not b.future.done():
                    b.future.set_result(b.replies)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_all(ConnectionError(f"redis: connection lost{': ' + str(exc) if exc else ''}"))
        if self.on_lost is not None:
            self.on_lost()

    # ---------------------------------------------------------------- commands

    def send(self, commands: list) -> asyncio.Future:
        """Send a batch of commands (tuples of arguments); the future gets their replies as one list."""
        loop = self._loop
        fut = loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionError("redis: not connected"))
            return fut
        if len(commands) == 1:
            data = encode_command(commands[0])
        else:
            data = b"".join([encode_command(c) for c in commands])
        b = _Batch(fut, len(commands), loop.time() + self.timeout)
        self._fifo.append(b)
        self.transport.write(data)
        if self._timer is None:
            self._timer = loop.call_at(b.deadline, self._check_deadlines)
        return fut

    async def call(self, *args):
        """One command; an error reply is raised as RespError."""
        r = (await self.send([args]))[0]
        if type(r) is RespError:
            raise r
        return r

    def _check_deadlines(self) -> None:
        self._timer = None
        now = self._loop.time()
        fifo = self._fifo
        for b in fifo:
            if b.deadline > now:
                self._timer = self._loop.call_at(b.deadline, self._check_deadlines)
                break
            if not b.future.done():
                b.future.set_exception(TimeoutError(f"redis: no reply within {self.timeout:g}s"))
        if fifo and now - fifo[0].deadline > self.stall_timeout:
            self.close()   # the server stopped answering: give up on this connection
            return
        if fifo and self._timer is None:
            self._timer = self._loop.call_at(now + max(self.timeout, 0.05), self._check_deadlines)

    def _fail_all(self, exc: Exception) -> None:
        fifo, self._fifo = self._fifo, deque()
        for b in fifo:
            if not b.future.done():
                b.future.set_exception(exc)
                b.future.exception()   # a caller that gave up must not log "exception never retrieved"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    @property
    def in_flight(self) -> int:
        return len(self._fifo)


def parse_redis_url(url: str) -> dict:
    """redis://[user:password@]host[:port][/db] (or rediss:// for TLS) as connection parameters."""
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected a redis:// or rediss:// URL, got {url!r}")
    db = (u.path or "/0").lstrip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"redis URL database must be a number: {url!r}")
    return {"host": u.hostname or "127.0.0.1", "port": u.port or 6379, "db": int(db),
            "username": unquote(u.username) if u.username else None,
            "password": unquote(u.password) if u.password else None, "tls": u.scheme == "rediss"}


async def connect(url: str, timeout: float, connect_timeout: float = 1.0,
                  on_push: Callable[[list], None] | None = None,
                  on_lost: Callable[[], None] | None = None, client_name: str = "pgpilot-cache") -> RedisConnection:
    """Open, authenticate and select the database; raises ConnectionError/TimeoutError/RespError."""
    p = parse_redis_url(url)
    loop = asyncio.get_running_loop()
    conn = RedisConnection(timeout, on_push=on_push, on_lost=on_lost)
    conn._loop = loop
    ctx = ssl_module.create_default_context() if p["tls"] else None
    try:
        await asyncio.wait_for(loop.create_connection(lambda: conn, p["host"], p["port"], ssl=ctx),
                               connect_timeout)
    except OSError as e:
        raise ConnectionError(f"redis: cannot connect to {p['host']}:{p['port']}: {e}") from None
    setup = []
    if p["password"] is not None:
        setup.append(("AUTH", p["username"], p["password"]) if p["username"] else ("AUTH", p["password"]))
    if p["db"]:
        setup.append(("SELECT", p["db"]))
    setup.append(("CLIENT", "SETNAME", client_name))
    saved, conn.timeout = conn.timeout, max(conn.timeout, connect_timeout)
    try:
        replies = await conn.send(setup)
    except BaseException:
        conn.close()
        raise
    finally:
        conn.timeout = saved
    for r in replies:
        if type(r) is RespError:
            conn.close()
            raise r
    return conn
