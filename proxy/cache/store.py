"""The shared tier: table generations, the epoch, cache entries and invalidation messages, in Redis
(`RedisStore`) or, without Redis, in this process (`LocalStore`, for a single proxy and the demo).

Layout under the key prefix P:
- P epoch            a random token; replaced to flush everything (DDL, recovery after Redis trouble)
- P g:<database>     a hash: field "epoch" (random, replaced when that database's change feed restarts)
                     and one counter per generation key (schema-qualified tree root), HINCRBY on write
- P e:<key hex>      an entry: "<tag>\\n<template>\\n<payload>", with a TTL as a backstop
- P inv              the pub/sub channel of invalidations (other instances drop their L1 entries)
The tag of an entry is the epoch, the database epoch and the generations read before the query ran. A lookup
reads them and the entry in one Lua call (shared by a batch of lookups) and only returns an entry stored under exactly those values, so an
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

# One call answers every lookup of a batch.
# KEYS: epoch, G database hashes, then one entry key per lookup.
# ARGV: G; per hash: the number of fields, then the fields ('epoch' first); per lookup: its hash's index
#       (0: it reads no table, the tag is the epoch alone) and its L1 candidate tag ('' if none).
# Returns {epoch, tag of hash 1..G, then per lookup the stored entry if it is stored under the current tag and
# the L1 candidate is not, else ''}; {''} when the epoch is missing, {'', h} when hash h has no epoch.
LOOKUP_LUA = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then return {''} end
local g = tonumber(ARGV[1])
local out = {epoch}
local a = 2
for h = 1, g do
  local n = tonumber(ARGV[a])
  local vals = redis.call('HMGET', KEYS[1 + h], unpack(ARGV, a + 1, a + n))
  if not vals[1] then return {'', h} end
  for i = 2, #vals do if not vals[i] then vals[i] = '0' end end
  out[1 + h] = epoch .. ':' .. table.concat(vals, ':')
  a = a + n + 1
end
local k = 2 + g
local o = 2 + g
while a <= #ARGV do
  local tag = out[1 + tonumber(ARGV[a])]
  local r = ''
  if tag ~= ARGV[a + 1] then
    local e = redis.call('GET', KEYS[k])
    if e and string.sub(e, 1, #tag + 1) == tag .. '\\n' then r = e end
  end
  out[o] = r
  a = a + 2
  k = k + 1
  o = o + 1
end
return out
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
        return (await self.lookup_many([(hash_key, fields, entry_key, l1_tag)]))[0]

    async def lookup_many(self, items: list[tuple]) -> list[tuple]:
        out = []
        for hash_key, fields, _, _ in items:
            tag = self._epoch
            if hash_key is not None:
                h = self._hashes.get(hash_key)
                if h is None:
                    h = self._hashes[hash_key] = {"epoch": new_epoch()}
                tag = tag + ":" + ":".join([h.get(f, "0") for f in fields])
            out.append((tag, None, None))
        return out

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
        return (await self.lookup_many([(hash_key, fields, entry_key, l1_tag)]))[0]

    async def lookup_many(self, items: list[tuple]) -> list[tuple]:
        """Lookups (database hash key or None, its fields, entry key, L1 candidate tag) in one Redis call: per item
        (tag, stored value or None, None) or (None, None, bypass reason); never raises."""
        if not self.serving:
            return [(None, None, self.bypass_reason)] * len(items)
        conn = self._conn
        groups: dict[tuple, int] = {}
        hashes: list[str] = []
        group_args: list = []
        entry_keys: list[str] = []
        lookup_args: list = []
        for hash_key, fields, entry_key, l1_tag in items:
            if hash_key is None:
                g = 0
            else:
                g = groups.get((hash_key, fields))
                if g is None:
                    g = groups[(hash_key, fields)] = len(groups) + 1
                    hashes.append(hash_key)
                    group_args.append(len(fields))
                    group_args.extend(fields)
            entry_keys.append(entry_key)
            lookup_args.append(g)
            lookup_args.append(l1_tag)
        command = ("EVALSHA", self._sha, 1 + len(hashes) + len(entry_keys), self.epoch_key, *hashes, *entry_keys,
                   len(hashes), *group_args, *lookup_args)
        for attempt in (1, 2):
            try:
                r = (await conn.send([command]))[0]
                if type(r) is resp.RespError and str(r).startswith("NOSCRIPT"):
                    r = (await conn.send([("EVAL", LOOKUP_LUA, *command[2:])]))[0]
                if type(r) is not resp.RespError and not r[0] and attempt == 1:
                    # No epoch (a new database hash, or Redis lost it): create fresh ones, then read again.
                    init = [("SET", self.epoch_key, new_epoch(), "NX")]
                    init.extend(("HSETNX", h, "epoch", new_epoch()) for h in hashes)
                    await conn.send(init)
                    continue
            except TimeoutError as e:
                self._failure("lookup", e)
                return [(None, None, "redis_timeout")] * len(items)
            except ConnectionError as e:
                self._failure("lookup", e)
                return [(None, None, "redis_down")] * len(items)
            break
        if type(r) is resp.RespError:
            self._failure("lookup", r)
            return [(None, None, "redis_error")] * len(items)
        self._success()
        if not r[0]:
            return [(None, None, "epoch_missing")] * len(items)
        tags = [t.decode() for t in r[:1 + len(hashes)]]
        base = 1 + len(hashes)
        return [(tags[lookup_args[2 * i]], r[base + i] or None, None) for i in range(len(items))]

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
