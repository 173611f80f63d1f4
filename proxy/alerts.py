"""Alert sinks for anomaly flags: a webhook POST and a Postgres NOTIFY, each behind its own bounded queue.

`offer(flag)` never blocks and never raises: it puts the flag on the sink's queue, or counts it as dropped
when the queue is full, so scoring is never delayed by a slow receiver. A task per sink sends what is queued:
WebhookSink POSTs each flag as a JSON document (HTTP/1.1, http:// or https://, anomaly.webhook_timeout per
request); NotifySink runs `SELECT pg_notify(channel, json)` on its own asyncpg connection (the payload is cut
below Postgres's 8000-byte limit) and reconnects with backoff when the connection is lost.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import Counter
from urllib.parse import urlparse

log = logging.getLogger("pgpilot.alerts")

_NOTIFY_MAX = 7900      # bytes of payload; Postgres refuses NOTIFY payloads of 8000 bytes or more


class _Sink:
    """A bounded queue and the task that empties it; `sent`, `failed` and `dropped` are counted."""

    name = "sink"

    def __init__(self, queue_size: int):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task | None = None

    def offer(self, flag) -> None:
        try:
            self.queue.put_nowait(flag)
        except asyncio.QueueFull:
            self.counts["dropped"] += 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"anomaly-{self.name}")

    async def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued for up to `timeout` seconds, then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except asyncio.TimeoutError:
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        await self.close()

    async def _run(self) -> None:
        while True:
            flag = await self.queue.get()
            try:
                await self.send(flag)
                self.counts["sent"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.counts["failed"] += 1
                log.warning("anomaly %s: could not send a flag: %s", self.name, e)
            finally:
                self.queue.task_done()

    async def send(self, flag) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class WebhookSink(_Sink):
    """POST each flag as JSON to a URL."""

    name = "webhook"

    def __init__(self, url: str, timeout: float = 2.0, queue_size: int = 1000):
        super().__init__(queue_size)
        self.url = url
        self.timeout = timeout
        u = urlparse(url)
        self._https = u.scheme == "https"
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or (443 if self._https else 80)
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._ssl = ssl.create_default_context() if self._https else None

    async def send(self, flag) -> None:
        body = json.dumps(flag.as_dict()).encode()
        await asyncio.wait_for(self._post(body), self.timeout)

    async def _post(self, body: bytes) -> None:
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
        try:
            writer.write(
                f"POST {self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                "User-Agent: pgpilot\r\n\r\n".encode() + body)
            await writer.drain()
            status = (await reader.readline()).decode("latin-1").split()
            if len(status) < 2 or not status[1].isdigit():
                raise ConnectionError("no HTTP status line in the answer")
            if not 200 <= int(status[1]) < 300:
                raise ConnectionError(f"HTTP {status[1]}")
        finally:
            writer.close()


class NotifySink(_Sink):
    """NOTIFY a channel with each flag, on a connection of its own to an upstream database."""

    name = "notify"

    def __init__(self, dsn: str, channel: str, queue_size: int = 1000, connect_timeout: float = 5.0):
        super().__init__(queue_size)
        self.dsn = dsn
        self.channel = channel
        self.connect_timeout = connect_timeout
        self._conn = None
        self._backoff = 0.0

    async def send(self, flag) -> None:
        payload = json.dumps(flag.as_dict())
        if len(payload.encode()) > _NOTIFY_MAX:
            d = flag.as_dict()
            d["query"] = d["query"][:200]
            d["reason"] = d["reason"][:500]
            payload = json.dumps(d)
        conn = await self._connection()
        try:
            await conn.execute("SELECT pg_notify($1, $2)", self.channel, payload)
        except Exception:
            await self.close()
            raise

    async def _connection(self):
        import asyncpg
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._backoff:
            await asyncio.sleep(self._backoff)
        try:
            self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout, statement_cache_size=4,
                                               server_settings={"application_name": "pgpilot-anomaly-notify"})
        except Exception:
            self._backoff = min(max(self._backoff * 2, 0.5), 10.0)
            raise
        self._backoff = 0.0
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()
