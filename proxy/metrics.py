"""Prometheus /metrics, /healthz and /readyz over a tiny asyncio HTTP server, read from plain counters at scrape time.

The hot path only bumps integers (proxy/stats.py, Pool.stats); a prometheus_client Collector turns them into
metric families when scraped, so no lock is taken per query. Process CPU and memory come from
prometheus_client's ProcessCollector (the conventional process_* names).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.admin import client_state, server_state
from proxy.config import parse_host_port
from proxy.pool import UpstreamError
from proxy.stats import DURATION_BUCKETS

if TYPE_CHECKING:
    from proxy.pool import Pool
    from proxy.server import ProxyServer

log = logging.getLogger("pgpilot.metrics")

CLIENT_STATES = ("active", "idle", "waiting", "starting")
SERVER_STATES = ("active", "idle", "resetting", "connecting")
_BUCKET_BOUNDS = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]

# The query log's stats() keys that only grow; the others are gauges.
_QUERYLOG_COUNTERS = {
    "submitted": ("events_submitted", "Query events handed to the query log"),
    "written": ("rows_written", "Log rows written to the log store"),
    "spooled": ("rows_spooled", "Log rows written to the local spool while the store was away or slow"),
    "replayed": ("rows_replayed", "Spooled log rows written to the store later"),
    "dropped": ("rows_dropped", "Log rows dropped because the queue or the spool was full"),
    "analysis_cache_hits": ("analysis_cache_hits", "Statement analyses found in the cache"),
    "analysis_cache_misses": ("analysis_cache_misses", "Statement analyses computed"),
}
_QUERYLOG_GAUGES = {
    "queued": ("queued_events", "Query events waiting for the writer"),
    "spool_bytes": ("spool_bytes", "Bytes in the local spool"),
    "store_connected": ("store_connected", "1 when the writer holds a connection to the log store"),
    "templates_known": ("templates_known", "Query templates the writer knows are in the store"),
    "analysis_cache_entries": ("analysis_cache_entries", "Statement analyses cached"),
}


class ProxyCollector(Collector):
    """Every pgpilot_* metric, computed from the server's state and counters when scraped."""

    def __init__(self, server: "ProxyServer"):
        self.server = server

    def describe(self):
        return []   # names are not checked for clashes at registration; collect() is cheap but not free

    def collect(self):
        server = self.server
        states, live = self._clients(server)
        yield from self._process_level(server)
        yield from self._pools(server, states)
        yield from self._traffic(server, live)
        if server.query_log is not None:
            yield from self._query_log(server.query_log.stats())
        if server.cache is not None:
            from proxy.cache.report import metric_families
            yield from metric_families(server.cache)
        if getattr(server, "models", None) is not None:
            yield from server.models.metric_families()

    def _process_level(self, server):
        from pgpilot import __version__
        info = GaugeMetricFamily("pgpilot_info", "pgpilot's version (always 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("pgpilot_start_time_seconds", "When the proxy started (Unix time)",
                                value=server.started_at)
        yield GaugeMetricFamily("pgpilot_ready", "1 while the proxy accepts client connections",
                                value=1 if server.listening else 0)
        st = server.stats
        yield CounterMetricFamily("pgpilot_client_connections_accepted", "Client connections accepted",
                                  value=st.clients_accepted)
        yield CounterMetricFamily("pgpilot_client_connections_refused",
                                  "Client connections refused by max_client_conn or a per-user/database cap",
                                  value=st.clients_refused)
        yield CounterMetricFamily("pgpilot_cancel_requests", "Cancel requests forwarded to a backend",
                                  value=st.cancels)
        errors = CounterMetricFamily("pgpilot_proxy_errors", "Errors the proxy itself answered, by SQLSTATE",
                                     labels=["sqlstate"])
        for sqlstate, n in sorted(st.errors_by_sqlstate.items()):
            errors.add_metric([sqlstate], n)
        yield errors
        reloads = CounterMetricFamily("pgpilot_config_reloads", "Configuration reloads (SIGHUP, RELOAD)",
                                      labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], server.reloads[result])
        yield reloads
        yield GaugeMetricFamily("pgpilot_config_last_reload_successful",
                                "1 if the last reload was applied (or none was tried)",
                                value=1 if server.last_reload_ok else 0)

    @staticmethod
    def _clients(server) -> tuple[dict, dict]:
        """One pass over the clients: states per database, and open sessions' bytes per (database, user)."""
        states: dict[str, dict[str, int]] = {}
        live: dict[tuple[str, str], list[int]] = {}
        for c in server.clients:
            db = c.database
            counts = states.get(db)
            if counts is None:
                counts = states[db] = dict.fromkeys(CLIENT_STATES, 0)
            counts[client_state(c)] += 1
            if c.traffic is not None:
                b = live.get((db, c.user))
                if b is None:
                    live[(db, c.user)] = [c.bytes_in, c.bytes_out]
                else:
                    b[0] += c.bytes_in
                    b[1] += c.bytes_out
        return states, live

    def _pools(self, server, per_db: dict):
        clients = GaugeMetricFamily("pgpilot_client_connections", "Client connections by database and state",
                                    labels=["database", "state"])
        for db, counts in sorted(per_db.items()):
            for state, n in counts.items():
                clients.add_metric([db, state], n)
        yield clients

        names = ["database"]
        servers = GaugeMetricFamily("pgpilot_server_connections", "Backend connections by database and state",
                                    labels=["database", "state"])
        size = GaugeMetricFamily("pgpilot_pool_size", "Backends a pool may open", labels=names)
        paused = GaugeMetricFamily("pgpilot_pool_paused", "1 while a pool is paused", labels=names)
        waiting = GaugeMetricFamily("pgpilot_pool_waiting_clients", "Clients waiting for a backend", labels=names)
        max_wait = GaugeMetricFamily("pgpilot_pool_max_wait_seconds", "How long the oldest waiting client has waited",
                                     labels=names)
        waits = CounterMetricFamily("pgpilot_pool_waits", "Times a client had to wait for a backend", labels=names)
        wait_s = CounterMetricFamily("pgpilot_pool_wait_seconds", "Time clients spent waiting for a backend",
                                     labels=names)
        connects = CounterMetricFamily("pgpilot_server_connects", "Backend connections opened", labels=names)
        failures = CounterMetricFamily("pgpilot_server_connect_failures", "Backend connections that failed to open",
                                       labels=names)
        now = time.perf_counter()
        for pool in server.all_pools():
            db = [pool.name]
            states = dict.fromkeys(SERVER_STATES, 0)
            for be in pool.all:
                state = server_state(pool, be)
                states[state] = states.get(state, 0) + 1
            states["connecting"] += pool.connecting
            for state, n in states.items():
                servers.add_metric([pool.name, state], n)
            size.add_metric(db, pool.size)
            paused.add_metric(db, 1 if pool.paused else 0)
            live = [c for c in pool.waiters if not c.closed and c.waiting]
            waiting.add_metric(db, len(live))
            max_wait.add_metric(db, max((now - c.wait_started for c in live), default=0.0))
            waits.add_metric(db, pool.stats["wait_count"])
            wait_s.add_metric(db, pool.stats["wait_us_total"] / 1e6)
            connects.add_metric(db, pool.stats["connects"])
            failures.add_metric(db, pool.stats["connect_failures"])
        yield from (servers, size, paused, waiting, max_wait, waits, wait_s, connects, failures)
        yield CounterMetricFamily("pgpilot_pool_wait_timeouts", "Clients that gave up waiting (query_wait)",
                                  value=server.stats.wait_timeouts)

    def _traffic(self, server, live: dict):
        labels = ["database", "user"]
        queries = CounterMetricFamily("pgpilot_queries", "Statements completed", labels=labels)
        errors = CounterMetricFamily("pgpilot_query_errors", "Statements that failed, by SQLSTATE class",
                                     labels=labels + ["sqlstate_class"])
        xacts = CounterMetricFamily("pgpilot_transactions", "Transactions completed", labels=labels)
        received = CounterMetricFamily("pgpilot_client_received_bytes", "Bytes received from clients",
                                       labels=labels)
        sent = CounterMetricFamily("pgpilot_client_sent_bytes", "Bytes sent to clients", labels=labels)
        duration = HistogramMetricFamily("pgpilot_query_duration_seconds",
                                         "Statement duration seen by the proxy", labels=labels)
        for key, t in sorted(server.stats.traffic.items()):
            lv = list(key)
            b_in, b_out = live.get(key, (0, 0))
            queries.add_metric(lv, t.queries)
            xacts.add_metric(lv, t.transactions)
            received.add_metric(lv, t.bytes_in + b_in)
            sent.add_metric(lv, t.bytes_out + b_out)
            for cls, n in sorted(t.errors_by_class.items()):
                errors.add_metric(lv + [cls], n)
            cumulative, buckets = 0, []
            for bound, n in zip(_BUCKET_BOUNDS, t.duration_buckets):
                cumulative += n
                buckets.append((bound, cumulative))
            duration.add_metric(lv, buckets, t.query_us_total / 1e6)
        yield from (queries, errors, xacts, received, sent, duration)

    def _query_log(self, stats: dict):
        for key, value in stats.items():
            if key in _QUERYLOG_COUNTERS:
                name, doc = _QUERYLOG_COUNTERS[key]
                yield CounterMetricFamily(f"pgpilot_querylog_{name}", doc, value=value)
            else:
                name, doc = _QUERYLOG_GAUGES.get(key, (key, f"query log: {key}"))
                yield GaugeMetricFamily(f"pgpilot_querylog_{name}", doc, value=value)


class MetricsServer:
    """GET /metrics, /healthz, /readyz on admin.http_listen; one short-lived HTTP/1.1 exchange per connection."""

    def __init__(self, server: "ProxyServer"):
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(server))
        ProcessCollector(registry=self.registry)
        self._http: asyncio.base_events.Server | None = None
        self._probe_locks: dict[str, asyncio.Lock] = {}

    async def start(self, listen: str) -> None:
        host, port = parse_host_port(listen)
        self._http = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        log.info("metrics on http://%s:%s/metrics", host, port)

    async def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body, head_only = await asyncio.wait_for(self._request(reader), 10)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError):
            writer.close()
            return
        try:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (b"" if head_only else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes, bool]:
        line = await reader.readline()
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            raise ValueError("not an HTTP request")
        for _ in range(100):   # headers are read and ignored
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                break
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n", False
        head = method == "HEAD"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry), head
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n", head
        if path == "/readyz":
            problems = await self.readiness()
            if problems:
                return "503 Service Unavailable", "text/plain", ("\n".join(problems) + "\n").encode(), head
            return "200 OK", "text/plain", b"ready\n", head
        return "404 Not Found", "text/plain", b"try /metrics, /healthz or /readyz\n", head

    async def readiness(self) -> list[str]:
        """What keeps the proxy from serving: not listening, or a database with no backend to be had."""
        if not self.server.listening:
            return ["not accepting client connections"]
        problems = []
        for name, pool in list(self.server.pools.items()):
            problem = await self._probe(pool)
            if problem:
                problems.append(f"{name}: {problem}")
        return problems

    async def _probe(self, pool: "Pool") -> str | None:
        if any(not be.closed for be in pool.all):
            return None
        lock = self._probe_locks.setdefault(pool.name, asyncio.Lock())
        async with lock:   # concurrent probes share one connection attempt
            if any(not be.closed for be in pool.all):
                return None
            if pool.connecting or pool.size <= 0:
                return str(pool.last_connect_error) if pool.last_connect_error else "no backend connected yet"
            pool.connecting += 1
            try:
                be = await pool.connect()
            except UpstreamError as e:
                return str(e)
            finally:
                pool.connecting -= 1
            pool.release(be)   # a warm backend for the first client
            return None
