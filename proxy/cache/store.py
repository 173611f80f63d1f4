"""The shared tier: table generations, the epoch, cache entries and invalidation messages, in Redis
(`RedisStore`) or, without Redis, in this process (`LocalStore`, for a single proxy and the demo).

Layout under the key prefix P:
- P epoch            a random token; replaced to flush everything (DDL, recovery after Redis trouble)
- P g:<database>     a hash: field "epoch" (random, replaced when that database's change feed restarts)
                     and one counter per generation key (schema-qualified tree root), HINCRBY on write
- P e:<key hex>      an entry: "<tag>\\n<template>\\n<payload>", with a TTL as a backstop
- P inv              the pub/sub channel of invalidations (other instances drop their L1 entries)
The tag of an entry is the epoch, the database epoch and the generations read before the query ran. A lookup
reads them and the entry in one Lua call and only returns an entry stored under exactly those values, so an
entry filled while a write was in flight is born unreachable. A missing epoch (Redis restarted, evicted the
hash) is replaced by a new random one: nothing stored before can match it again.

Failure handling: N consecutive timeouts/errors open a circuit breaker (everything bypasses for a cooldown).
An invalidation that cannot be recorded, or a lost connection (Redis may have restarted from an old
snapshot), makes the store inconsistent: nothing is served until a recovery has replaced the epoch.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from typing import Callable

from proxy.cache import resp

log = logging.getLogger("pgpilot.cache")

# KEYS: epoch, entry[, database hash]   ARGV: L1 candidate tag ('' if none), then 'epoch' and the table fields
LOOKUP_LUA = """
local tag = redis.call('GET', KEYS[1])
if not tag then return {'', 'g'} end
if #KEYS == 3 then
  local vals = redis.call('HMGET', KEYS[3], unpack(ARGV, 2))
  if not vals[1] then return {'', 'd'} end
  for i = 2, #vals do if not vals[i] then vals[i] = '0' end end
  tag = tag .. ':' .. table.concat(vals, ':')
end
if tag == ARGV[1] then return {tag} end
local e = redis.call('GET', KEYS[2])
if e and string.sub(e, 1, #tag + 1) == tag .. '\\n' then return {tag, e} end
return {tag}
"""


def new_epoch() -> str:
    return secrets.token_hex(8)


class SharedStore:
    """The interface the engine uses; see RedisStore and LocalStore."""

    shared = False

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.epoch_key = prefix + "epoch"
        self.channel = prefix + "inv"
        self.counts: Counter[str] = Counter()

    def hash_key(self, database: str) -> str:
        return f"{self.prefix}g:{database}"

    def entry_key(self, key: bytes) -> str:
        return f"{self.prefix}e:{key.hex()}"

    @property
    def serving(self) -> bool:
        return True

    @property
    def bypass_reason(self) -> str:
        return "redis_down"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalStore(SharedStore):
    """Generations in this process: entries live in the L1 only. Sound for one proxy process."""

    def __init__(self, prefix: str = "pgpilot:"):
        super().__init__(prefix)
        self._epoch = new_epoch()
        self._hashes: dict[str, dict[str, str]] = {}

    async def lookup(self, hash_key: str | None, fields: tuple[str, ...], entry_key: str, l1_tag: str):
        tag = self._epoch
        if hash_key is not None:
            h = self._hashes.get(hash_key)
            if h is None:
                h = self._hashes[hash_key] = {"epoch": new_epoch()}
            tag = tag + ":" + ":".join([h.get(f, "0") for f in fields])
        return tag, None, None

    def store(self, entry_key: str, value: bytes, ttl_ms: int) -> None:
        pass

    async def bump(self, flush: bool, groups: dict[str, list[str]], message: str) -> bool:
        if flush:
            self._epoch = new_epoch()
        for h, fields in groups.items():
            gens = self._hashes.setdefault(h, {"epoch": new_epoch()})
            for f in fields:
                gens[f] = str(int(gens.get(f, "0")) + 1)
        return True

    async def reset_db_epoch(self, hash_key: str) -> bool:
        self._hashes.setdefault(hash_key, {})["epoch"] = new_epoch()
        return True

    def stats(self) -> dict:
        return {"kind": "local", "serving": True, "consistent": True}


class RedisStore(SharedStore):
    shared = True

    def __init__(self, url: str, prefix: str, timeout: float, breaker_failures: int, breaker_cooldown: float,
                 on_message: Callable[[bytes], None] | None = None, on_inconsistent: Callable[[], None] | None = None):
        super().__init__(prefix)
        self.url = url
        self.timeout = timeout
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self.on_message = on_message
        self.on_inconsistent = on_inconsistent
        self.consistent = False
        self._conn: resp.RedisConnection | None = None
        self._sub: resp.RedisConnection | None = None
        self._sha: str | None = None
        self._fails = 0
        self._open_until = 0.0
        self._stopped = False
        self._ever_connected = False
        self._recovery: asyncio.Task | None = None
        self._subscriber: asyncio.Task | None = None
        self._stores: dict[str, tuple] = {}
        self._store_scheduled = False
        self._last_error = ""
        self.breaker_trips = 0
        self.recoveries = 0

    # ---------------------------------------------------------------- state

    @property
    def serving(self) -> bool:
        c = self._conn
        return self.consistent and c is not None and not c.closed and time.monotonic() >= self._open_until

    @property
    def bypass_reason(self) -> str:
        if time.monotonic() < self._open_until:
            return "breaker_open"
        if self._conn is None or self._conn.closed:
            return "redis_down"
        return "inconsistent"

    def _success(self) -> None:
        self._fails = 0

    def _failure(self, what: str, exc: BaseException) -> None:
        self._fails += 1
        self._last_error = f"{what}: {exc}"
        if self._fails >= self.breaker_failures and time.monotonic() >= self._open_until:
            self._open_until = time.monotonic() + self.breaker_cooldown
            self.breaker_trips += 1
            log.warning("cache: Redis circuit open for %.1fs after %d failures (last: %s)",
                        self.breaker_cooldown, self._fails, self._last_error)

    def _mark_inconsistent(self, why: str) -> None:
        if self.consistent:
            log.warning("cache: stops serving until Redis generations are consistent again (%s)", why)
        self.consistent = False
        if self.on_inconsistent is not None:
            self.on_inconsistent()
        self._ensure_recovery()

    def _ensure_recovery(self) -> None:
        if self._stopped or (self._recovery is not None and not self._recovery.done()):
            return
        self._recovery = asyncio.get_running_loop().create_task(self._recover(), name="cache-redis-recovery")

    def _connection_lost(self) -> None:
        if not self._stopped:
            self._mark_inconsistent("connection to Redis lost")

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        try:
            await self._connect(first=True)
        except Exception as e:  # noqa: BLE001 - any failure leaves the cache bypassing, never the proxy down
            log.warning("cache: Redis unavailable at start (%s); bypassing until it answers", e)
            self._ensure_recovery()
        self._subscriber = asyncio.get_running_loop().create_task(self._subscribe_loop(), name="cache-pubsub")

    async def _connect(self, first: bool) -> None:
        """Connect, load the lookup script and settle the epoch; on success the store is consistent."""
        old, self._conn = self._conn, None
        if old is not None:
            old.on_lost = None
            old.close()
        conn = await resp.connect(self.url, self.timeout, connect_timeout=max(1.0, self.timeout),
                                  on_lost=self._connection_lost)
        try:
            conn.timeout = max(1.0, self.timeout)   # setup is not on the hot path
            self._sha = (await conn.call("SCRIPT", "LOAD", LOOKUP_LUA)).decode()
            if first and not self._ever_connected:
                # A new process has recorded nothing yet: only create the epoch if there is none.
                await conn.call("SET", self.epoch_key, new_epoch(), "NX")
            else:
                # After trouble, writes may have gone unrecorded (or Redis restarted from an old snapshot).
                await conn.call("SET", self.epoch_key, new_epoch())
                await conn.call("PUBLISH", self.channel, "*")
            conn.timeout = self.timeout
        except BaseException:
            conn.on_lost = None
            conn.close()
            raise
        self._conn = conn
        self._ever_connected = True
        self._fails = 0
        self._open_until = 0.0
        self.consistent = True

    async def _recover(self) -> None:
        delay = min(0.2, self.breaker_cooldown)
        while not self._stopped and not self.serving:
            await asyncio.sleep(max(delay, self._open_until - time.monotonic()))
            if self._stopped:
                return
            try:
                await self._connect(first=False)
                self.recoveries += 1
                log.info("cache: Redis generations consistent again (epoch replaced); serving resumes")
                return
            except Exception as e:  # noqa: BLE001
                self._last_error = f"recovery: {e}"
                delay = self.breaker_cooldown

    async def _subscribe_loop(self) -> None:
        while not self._stopped:
            lost = asyncio.Event()
            try:
                sub = await resp.connect(self.url, max(1.0, self.timeout), on_push=self._push,
                                         on_lost=lost.set, client_name="pgpilot-cache-sub")
                self._sub = sub
                await sub.send([("SUBSCRIBE", self.channel)])
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - L1 stays correct without it (every hit is checked in Redis)
                pass
            finally:
                if self._sub is not None:
                    self._sub.on_lost = None
                    self._sub.close()
                    self._sub = None
            if not self._stopped:
                await asyncio.sleep(self.breaker_cooldown)

    def _push(self, reply) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message" and self.on_message is not None:
            self.on_message(reply[2])

    async def stop(self) -> None:
        self._stopped = True
        for t in (self._recovery, self._subscriber):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await asyncio.wait_for(t, 1.0)
                except BaseException:  # noqa: BLE001 - shutting down
                    pass
        for c in (self._conn, self._sub):
            if c is not None:
                c.on_lost = None
                c.close()
        self._conn = self._sub = None
        self.consistent = False

    # ---------------------------------------------------------------- operations

    async def lookup(self, hash_key: str | None, fields: tuple[str, ...], entry_key: str, l1_tag: str):
        """(tag, stored value or None, None) or (None, None, bypass reason); never raises."""
        if not self.serving:
            return None, None, self.bypass_reason
        conn = self._conn
        keys = (self.epoch_key, entry_key, hash_key) if hash_key is not None else (self.epoch_key, entry_key)
        command = ("EVALSHA", self._sha, len(keys), *keys, l1_tag, *fields)
        for attempt in (1, 2):
            try:
                r = (await conn.send([command]))[0]
                if type(r) is resp.RespError and str(r).startswith("NOSCRIPT"):
                    r = (await conn.send([("EVAL", LOOKUP_LUA, *command[2:])]))[0]
                if type(r) is not resp.RespError and not r[0] and attempt == 1:
                    # No epoch (a new database hash, or Redis lost it): create a fresh one, then read again.
                    init = [("SET", self.epoch_key, new_epoch(), "NX")]
                    if hash_key is not None:
                        init.append(("HSETNX", hash_key, "epoch", new_epoch()))
                    await conn.send(init)
                    continue
            except TimeoutError as e:
                self._failure("lookup", e)
                return None, None, "redis_timeout"
            except ConnectionError as e:
                self._failure("lookup", e)
                return None, None, "redis_down"
            break
        if type(r) is resp.RespError:
            self._failure("lookup", r)
            return None, None, "redis_error"
        self._success()
        tag = r[0].decode()
        if not tag:
            return None, None, "epoch_missing"
        return tag, (r[1] if len(r) > 1 else None), None

    def store(self, entry_key: str, value: bytes, ttl_ms: int) -> None:
        """Queue a SET; queued sets go out together once the current callbacks have run."""
        self._stores[entry_key] = ("SET", entry_key, value, "PX", ttl_ms)   # one store per key per batch
        if not self._store_scheduled:
            self._store_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_stores)

    def _send_stores(self) -> None:
        self._store_scheduled = False
        cmds, self._stores = list(self._stores.values()), {}
        if not cmds:
            return
        if not self.serving:
            self.counts["store_dropped"] += len(cmds)
            return
        fut = self._conn.send(cmds)
        fut.add_done_callback(self._stores_done)

    def _stores_done(self, fut: asyncio.Future) -> None:
        exc = fut.exception()
        if exc is not None:
            self._failure("store", exc)
            self.counts["store_failed"] += 1
        else:
            self.counts["store_ok"] += len(fut.result())

    async def bump(self, flush: bool, groups: dict[str, list[str]], message: str) -> bool:
        """Record writes (and a flush); True once Redis acknowledged them. A failure makes the store inconsistent."""
        if not self.serving and self.bypass_reason != "inconsistent":
            self._mark_inconsistent(f"invalidation not recorded ({self.bypass_reason})")
            return False
        cmds: list[tuple] = []
        if flush:
            cmds.append(("SET", self.epoch_key, new_epoch()))
        for h, fields in groups.items():
            cmds.extend(("HINCRBY", h, f, 1) for f in fields)
        cmds.append(("PUBLISH", self.channel, message))
        try:
            replies = await self._conn.send(cmds)
        except (TimeoutError, ConnectionError) as e:
            self._failure("invalidate", e)
            self._mark_inconsistent(f"invalidation not recorded: {e}")
            return False
        if any(type(r) is resp.RespError for r in replies):
            err = next(r for r in replies if type(r) is resp.RespError)
            self._failure("invalidate", err)
            self._mark_inconsistent(f"invalidation not recorded: {err}")
            return False
        self._success()
        return True

    async def reset_db_epoch(self, hash_key: str) -> bool:
        if self._conn is None or self._conn.closed:
            self._mark_inconsistent("database epoch not replaced")
            return False
        try:
            r = await self._conn.send([("HSET", hash_key, "epoch", new_epoch()), ("PUBLISH", self.channel, "*")])
            if any(type(x) is resp.RespError for x in r):
                raise ConnectionError(str(r))
        except (TimeoutError, ConnectionError) as e:
            self._failure("epoch", e)
            self._mark_inconsistent(f"database epoch not replaced: {e}")
            return False
        return True

    def stats(self) -> dict:
        c = self._conn
        return {"kind": "redis", "serving": self.serving, "consistent": self.consistent,
                "bypass_reason": None if self.serving else self.bypass_reason,
                "breaker_open": time.monotonic() < self._open_until, "breaker_trips": self.breaker_trips,
                "recoveries": self.recoveries, "in_flight": c.in_flight if c is not None else 0,
                "last_error": self._last_error, **self.counts}
