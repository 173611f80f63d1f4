"""The proxy process: listeners, the shared server state that sessions and pools hang off, signals, housekeeping.

`pgpilot serve -c config.yaml` lands in main(). One asyncio (uvloop when available) process; run several
behind a load balancer or with SO_REUSEPORT to use more cores.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import Counter

from proxy import protocol as P
from proxy.admin import AdminConsole
from proxy.auth import ClientAuth
from proxy.config import Config, ConfigError, load_config
from proxy.pool import Pool
from proxy.session import ClientSession, StatementNames
from proxy.stats import ServerStats

log = logging.getLogger("pgpilot.server")


class ProxyServer:
    """Shared state of one proxy process: config, pools, clients, cancel keys; walked by shutdown."""

    def __init__(self, config: Config, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.pools: dict[str, Pool] = {
            name: Pool(name, db, config.pool_size_for(name), config.timeouts)
            for name, db in config.databases.items()}
        self.clients: set[ClientSession] = set()
        self.cancel_keys: dict[int, ClientSession] = {}
        self.statement_names = StatementNames()
        self.stats = ServerStats()
        self.auth = ClientAuth(config)   # client authentication and TLS (proxy/auth.py, proxy/tls.py)
        self.query_log = None
        # The admin console, reached as the virtual database config.admin.database (None when that is unset).
        self.console = AdminConsole(self)
        self.admin: AdminConsole | None = self.console if config.admin.database else None
        self.cache = None          # the result cache (proxy.cache.ResultCache) when cache.enabled
        self.guard = None          # inline statement guard (anomaly enforce mode): .check(raw Query/Parse) -> reason|None
        self.scorer = None         # anomaly scorer: scores the statement feed's batches (proxy.querylog)
        self.models = None         # proxy.served_models.ServedModels: scorer, guard, learned admission, predictions
        self.proxy_id = f"{socket.gethostname()}:{os.getpid()}"
        self._client_ids = 0
        self._xact_ids = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: list[asyncio.Task] = []
        self.stopping = False
        self.stopped = asyncio.Event()
        self._hurry = asyncio.Event()              # SIGINT during a graceful shutdown: stop waiting
        self.started_at = time.time()
        self.metrics = None                        # proxy.metrics.MetricsServer when admin.http_listen is set
        self.retired_pools: dict[str, Pool] = {}   # removed by a reload; kept while their clients remain
        self.reloads: Counter[str] = Counter()     # "ok" / "failed"
        self.last_reload_ok = True
        self.last_reload_at = 0.0
        self.clients_per_user: Counter[str] = Counter()
        self.clients_per_database: Counter[str] = Counter()
        self._counted: dict[ClientSession, tuple[str, str]] = {}

    # ---------------------------------------------------------------- ids and registries

    def next_client_id(self) -> int:
        self._client_ids += 1
        return self._client_ids

    def next_xact_id(self) -> int:
        self._xact_ids += 1
        return self._xact_ids

    def admit(self, client: ClientSession) -> bool:
        if self.stopping or len(self.clients) >= self.config.max_client_conn:
            self.stats.clients_refused += 1
            return False
        self.clients.add(client)
        self.stats.clients_accepted += 1
        return True

    def admit_user(self, client: ClientSession) -> bool:
        """Per-user and per-database caps, once the client's startup named them; False: refused (53300)."""
        cfg = self.config
        user, database = client.user, client.database
        refusal = None
        if cfg.max_client_conn_per_user and self.clients_per_user[user] >= cfg.max_client_conn_per_user:
            refusal = f'too many connections for role "{user}"'
        elif (cfg.max_client_conn_per_database
              and self.clients_per_database[database] >= cfg.max_client_conn_per_database):
            refusal = f'too many connections for database "{database}"'
        if refusal is not None:
            self.stats.clients_refused += 1
            client.fatal("53300", refusal)
            return False
        self.clients_per_user[user] += 1
        self.clients_per_database[database] += 1
        self._counted[client] = (user, database)
        if cfg.log_connections:
            log.info("client connected", extra=client_fields(client, application_name=client.application_name))
        return True

    def forget(self, client: ClientSession) -> None:
        self.clients.discard(client)
        if self.cancel_keys.get(client.cancel_pid) is client:
            del self.cancel_keys[client.cancel_pid]
        counted = self._counted.pop(client, None)
        if counted is not None:
            user, database = counted
            for counter, key in ((self.clients_per_user, user), (self.clients_per_database, database)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]
        if (counted is not None or client.admin is not None) and self.config.log_connections:
            log.info("client disconnected", extra=client_fields(
                client, duration_s=round(time.time() - client.connected_at, 3), bytes_in=client.bytes_in,
                bytes_out=client.bytes_out))

    async def authenticate(self, client: ClientSession, params: dict[str, str]) -> bool:
        """Client authentication during startup; False means the client was refused (and told why)."""
        return await self.auth.authenticate(client, params)

    def reload_auth(self, new_config: Config) -> None:
        """Apply a new config's auth and tls sections to clients that connect from now on.

        Raises OSError (an unreadable certificate, key or auth_file) to reject the new config; the old one stays.
        """
        auth = ClientAuth(new_config)
        old, self.auth = self.auth, auth
        self._spawn(old.close())

    def register_cancel_key(self, client: ClientSession) -> tuple[int, int]:
        while True:
            pid = random.randrange(1, 2**31)
            if pid not in self.cancel_keys:
                break
        self.cancel_keys[pid] = client
        return pid, random.randrange(0, 2**32)

    def cancel(self, pid: int, secret: int) -> None:
        client = self.cancel_keys.get(pid)
        if client is None or client.cancel_secret != secret:
            log.info("cancel request for an unknown key ignored")
            return
        self.stats.cancels += 1
        client.cancel_running()

    def send_cancel(self, be) -> None:
        db = be.pool.db

        async def _send():
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(db.host, db.port), self.config.timeouts.connect)
                writer.write(P.cancel_request(be.pid, be.secret))
                await writer.drain()
                writer.close()
            except (OSError, asyncio.TimeoutError) as e:
                log.warning("could not send a cancel request to %s:%s: %s", db.host, db.port, e)

        self._spawn(_send())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.query_log.enabled and self.config.databases:
            self.query_log = self._make_query_log()
            if self.query_log is not None:
                await self.query_log.start()
        if self.config.cache.enabled:
            from proxy.cache import ResultCache
            from proxy.cache.report import show_cache
            self.cache = ResultCache(self.config.cache, {name: self.database_dsn(name) for name in self.config.databases})
            await self.cache.start()
            self.console.register("SHOW CACHE", lambda req: show_cache(self.cache),
                                  "result cache: hits, misses, bypass reasons, bytes, invalidations, decoding lag")
        if self.config.models.enabled or self.config.anomaly.enabled:
            from proxy.served_models import ServedModels
            self.models = ServedModels(self)   # sets self.scorer and self.guard, wraps the cache's admission
            await self.models.start()
        await self._start_metrics()   # first, so whoever sees the client port open can scrape too
        host, port = self.config.listen_address
        srv = await loop.create_server(lambda: ClientSession(self), host, port, backlog=4096, reuse_address=True)
        self._servers.append(srv)
        self._spawn(self._housekeeping())
        log.info("pgpilot listening on %s:%s (%s pooling, databases: %s)", host, port, self.config.pool_mode,
                 ", ".join(self.pools) or "none")

    async def _start_metrics(self) -> None:
        listen = self.config.admin.http_listen
        if listen:
            from proxy.metrics import MetricsServer
            self.metrics = MetricsServer(self)
            await self.metrics.start(listen)

    async def _restart_metrics(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        try:
            await self._start_metrics()
        except OSError as e:
            log.error("cannot listen for metrics on %s: %s", self.config.admin.http_listen, e)

    @property
    def listening(self) -> bool:
        return not self.stopping and any(srv.is_serving() for srv in self._servers)

    def all_pools(self) -> list[Pool]:
        """Pools of configured databases, then those a reload removed that still have clients."""
        return [*self.pools.values(), *self.retired_pools.values()]

    def _make_query_log(self):
        try:
            from proxy.querylog import QueryLog
        except ImportError:
            log.warning("query log writer unavailable; query logging disabled")
            return None
        cfg = self.config.query_log
        dsn = cfg.dsn or self.default_store_dsn()
        return QueryLog(cfg, dsn, self.proxy_id)

    def default_store_dsn(self) -> str:
        return self.database_dsn(next(iter(self.config.databases)))

    def database_dsn(self, name: str) -> str:
        """A libpq URL for a configured upstream database, with its credentials."""
        from urllib.parse import quote
        db = self.config.databases[name]
        auth = quote(db.user) + (":" + quote(db.password) if db.password else "")
        return f"postgresql://{auth}@{db.host}:{db.port}/{quote(db.dbname)}"

    async def _housekeeping(self) -> None:
        """Once a second: idle and transaction timeouts, stuck queries, idle backends."""
        while not self.stopping:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            t = self.config.timeouts
            wait_limit = time.perf_counter() - t.query_wait
            login_deadline = time.time() - (self.config.auth.timeout if self.config.auth else 60.0)
            for client in list(self.clients):
                if client.closed:
                    continue
                if client.state != "ready":
                    # A connection that never finishes its startup must not hold a client slot forever.
                    if client.state == "startup" and client.connected_at < login_deadline:
                        client.fatal("08P01", "no startup packet within the authentication timeout")
                    continue
                if client.waiting:
                    if client.wait_started < wait_limit:
                        log.info("no backend within query_wait", extra=client_fields(client))
                        client.wait_timed_out()
                    continue
                idle = now - client.last_activity
                if client.pending:
                    if t.query and now - client.busy_since > t.query and not getattr(client, "_timeout_cancelled", False):
                        client._timeout_cancelled = True
                        client.cancel_running()
                    continue
                client._timeout_cancelled = False
                if client.txn_status != b"I" and t.idle_in_transaction and idle > t.idle_in_transaction:
                    client.fatal("25P03", "terminating connection due to idle-in-transaction timeout")
                elif client.txn_status == b"I" and t.client_idle and idle > t.client_idle and client.stash is None:
                    client.fatal("57P05", "terminating connection due to idle-session timeout")
            for pool in self.pools.values():
                pool.close_idle_older_than(t.server_idle, now)
            self._drop_retired_pools()

    def _drop_retired_pools(self) -> None:
        """Close a removed database's backends once none of its clients is left."""
        for name, pool in list(self.retired_pools.items()):
            if not any(c.pool is pool for c in self.clients):
                pool.close_all()
                del self.retired_pools[name]
                log.info("database %s: last client gone, pool closed", name)

    def request_shutdown(self, graceful: bool) -> None:
        """From a signal or the console: start the shutdown, or make a graceful one stop waiting."""
        if self.stopping:
            if not graceful:
                self._hurry.set()
            return
        self._spawn(self.shutdown(graceful))

    async def shutdown(self, graceful: bool) -> None:
        """Stop accepting; graceful: let open transactions finish (up to timeouts.shutdown); then close all."""
        if self.stopping:
            return
        self.stopping = True
        for srv in self._servers:
            srv.close()
        # A new transaction waits in its paused pool and is turned away below; open ones keep their backends.
        for pool in self.all_pools():
            pool.paused = True
        if graceful:
            timeout = self.config.timeouts.shutdown
            log.info("shutting down: waiting up to %gs for %d client(s)' open transactions", timeout,
                     sum(1 for c in self.clients if _in_transaction(c)))
            deadline = time.monotonic() + timeout
            while not self._hurry.is_set():
                busy = 0
                for c in list(self.clients):
                    if _in_transaction(c):
                        busy += 1
                    else:
                        self._terminate(c)
                if not busy or time.monotonic() >= deadline:
                    break
                try:
                    await asyncio.wait_for(self._hurry.wait(), 0.02)
                except asyncio.TimeoutError:
                    pass
        else:
            log.info("shutting down now")
        # Stop the flow from backends, so no client is left with half of a message before its error.
        for pool in self.all_pools():
            for be in pool.lent:
                be.pause_reading(True)
        left = [c for c in self.clients if not c.closed]
        if left:
            log.info("closing %d client connection(s)", len(left))
        for c in left:
            self._terminate(c)
        for pool in self.all_pools():
            pool.close_all()
        await self._until_clients_gone(2.0)
        if self.metrics is not None:
            await self.metrics.stop()
        if self.models is not None:
            await _best_effort("models", self.models.stop())   # scores what is buffered before the log stops
        if self.cache is not None:
            await _best_effort("result cache", self.cache.stop())
        await _best_effort("client authentication", self.auth.close())
        if self.query_log is not None:
            await _best_effort("query log", self.query_log.stop())
        self.stopped.set()

    def _terminate(self, c: ClientSession) -> None:
        if c.closed:
            return
        be = c.backend
        if be is not None and getattr(be.splitter, "_skip", 0):
            c.close()   # part of a message is out: an ErrorResponse now would garble the stream
        else:
            c.fatal("57P01", "terminating connection due to administrator command")

    async def _until_clients_gone(self, timeout: float) -> None:
        """Closed transports flush what they were told (the FATAL messages) before the loop stops."""
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # ---------------------------------------------------------------- online configuration changes

    def reload(self) -> str | None:
        """Re-read the config file and apply it. On a problem the running config stays; returns the problem."""
        self.last_reload_at = time.time()
        source = str(self.config_path) if self.config_path else "<environment>"
        try:
            new = load_config(self.config_path)
            if not new.databases:
                raise ConfigError(f"{source}: databases: no databases configured")
            reload_auth = getattr(self, "reload_auth", None)
            if reload_auth is not None:
                reload_auth(new)    # raises to reject the new config
        except (ConfigError, OSError, ValueError) as e:
            self.reloads["failed"] += 1
            self.last_reload_ok = False
            log.error("configuration reload rejected, the running configuration stays: %s", e)
            return str(e)
        self._apply_config(new)
        self.reloads["ok"] += 1
        self.last_reload_ok = True
        log.info("configuration reloaded from %s", source)
        return None

    def _apply_config(self, new: Config) -> None:
        old = self.config
        for name, db in new.databases.items():
            size = new.pool_size_for(name)
            pool = self.pools.get(name) or self.retired_pools.pop(name, None)
            if pool is None:
                self.pools[name] = Pool(name, db, size, new.timeouts)
                log.info("database %s added (pool_size %d)", name, size)
                continue
            self.pools[name] = pool
            if _upstream(pool.db) != _upstream(db):
                # Backends to the old upstream serve their current transaction, then close.
                for be in list(pool.all):
                    be.broken = True
                for be in list(pool.idle):
                    be.close()
                pool.server_params = None
                log.info("database %s now goes to %s:%s/%s", name, db.host, db.port, db.dbname)
            pool.db = db
            pool.timeouts = new.timeouts
            if pool.size != size:
                log.info("database %s: pool_size %d -> %d", name, pool.size, size)
                pool.resize(size)
        for name in [n for n in self.pools if n not in new.databases]:
            self.retired_pools[name] = self.pools.pop(name)
            log.info("database %s removed: new clients are refused, connected ones carry on", name)
        for key in ("listen", "query_log", "cache", "models", "anomaly"):
            if getattr(old, key) != getattr(new, key):
                log.warning("%s changed: takes effect at the next restart", key)
        self.admin = self.console if new.admin.database else None
        self.config = new
        if (old.log_level, old.log_format) != (new.log_level, new.log_format):
            setup_logging(new.log_level, new.log_format)
        if old.admin.http_listen != new.admin.http_listen:
            self._spawn(self._restart_metrics())
        self._drop_retired_pools()


async def _best_effort(what: str, stopping, timeout: float = 10.0) -> None:
    """Await a component's stop; a component must never keep the proxy from stopping."""
    try:
        await asyncio.wait_for(stopping, timeout)
    except Exception as e:
        log.warning("%s did not stop cleanly: %s", what, e)


def _upstream(db) -> dict:
    """What identifies an upstream connection (everything but the pool size)."""
    return db.model_dump(exclude={"pool_size"})


def _in_transaction(c: ClientSession) -> bool:
    """A client with a request in flight, an open transaction, or answers held back (for the cache's
    invalidations); waiting for a backend does not count."""
    return c.state == "ready" and not c.closed and bool(c.pending or c.txn_status != b"I" or c.hold is not None)


# -------------------------------------------------------------------- process entry point

# Structured fields a log line may carry (logging's `extra=`): they tie a client, its backend and its queries
# together. JSON lines carry them as keys; plain lines end with key=value pairs.
LOG_FIELDS = ("client", "backend", "user", "database", "addr", "application_name", "sqlstate", "duration_s",
              "bytes_in", "bytes_out", "fingerprint", "anomaly_class", "score")


def client_fields(client: ClientSession, **more) -> dict:
    """The log fields of a client connection (for `extra=`)."""
    be = client.backend
    fields = {"client": client.id, "backend": be.pid if be is not None else None, "user": client.user or None,
              "database": client.database or None, "addr": client.client_addr}
    fields.update(more)
    return fields


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k in LOG_FIELDS if (v := getattr(record, k, None)) is not None and v != ""}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _PlainFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: Config, config_path: str | None = None) -> int:
    server = ProxyServer(config, config_path)
    await server.start()
    # What start-up built (modules, config, models, pools) lives as long as the process: out of the collector's
    # generations, a full collection no longer walks it (the imports alone are ~71k objects, ~12 ms a collection).
    gc.freeze()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.request_shutdown, True)
    loop.add_signal_handler(signal.SIGINT, server.request_shutdown, False)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await server.stopped.wait()
    log.info("pgpilot stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgpilot serve", description="Run the pgpilot proxy.")
    parser.add_argument("-c", "--config", help="config file (YAML); PGPILOT_LISTEN / PGPILOT_UPSTREAM override it")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"pgpilot: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    if not config.databases:
        print("pgpilot: no databases configured (set `databases` in the config file or PGPILOT_UPSTREAM)",
              file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    install_event_loop_policy()
    profile_path = os.environ.get("PGPILOT_PROFILE")  # write a cProfile of the whole run here at exit
    profiler = None
    if profile_path:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        return asyncio.run(serve(config, args.config))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
