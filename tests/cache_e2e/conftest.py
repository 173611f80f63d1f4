"""Fixtures for the cache acceptance tests: pgpilot proxies with the result cache on, and how to read what it did.

Hits are counted from the proxy's own SHOW CACHE (admin console), read before and after the behaviour under test.
"""
from __future__ import annotations

import struct
import time
import uuid

import psycopg
import pytest

from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.wire import RawConnection, query


def cache_section(redis_url: str | None, **overrides) -> dict:
    """The proxy's `cache:` section for tests: a private key prefix in the shared Redis, generous timeouts (the
    machine is shared), fast catalog checks, and every result admitted (the admission heuristic is tested
    elsewhere; here a declined template would hide what the cache serves)."""
    section = dict(enabled=True, redis_url=redis_url, key_prefix=f"e2e{uuid.uuid4().hex[:8]}:", redis_timeout=0.5,
                   catalog_check_interval=0.2, admission_min_saved_us=0, admission_lookup_us=0)
    section.update(overrides)
    return section


def proxy_config(pg, dbname: str, redis_url: str | None, *, cache: dict | None = None, **config) -> dict:
    """A whole proxy configuration for `dbname` with the cache on and no served models (their admission
    decisions would depend on whatever a learner left in the registry)."""
    return {"databases": {dbname: upstream_entry(pg, dbname)},
            "cache": cache if cache is not None else cache_section(redis_url),
            "models": {"enabled": False}, **config}


def cache_stats(proxy: ProxyProcess) -> dict[str, str]:
    """SHOW CACHE from the proxy's admin console, as {name: value}."""
    with RawConnection(proxy.host, proxy.port) as conn:
        conn.start("postgres", "pgpilot")
        conn.send(query("SHOW CACHE"))
        rows = {}
        for kind, body in conn.read_until_ready():
            if kind == b"E":
                raise RuntimeError(f"SHOW CACHE failed: {body!r}")
            if kind == b"D":
                name, value = data_row(body)[:2]
                rows[name.decode()] = value.decode()
        return rows


def data_row(body: bytes) -> list[bytes | None]:
    """The column values of a DataRow body (None for NULL)."""
    (n,) = struct.unpack_from("!h", body, 0)
    pos, values = 2, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length])
            pos += length
    return values


def hits(proxy: ProxyProcess) -> int:
    return int(cache_stats(proxy)["hits"])


def stat(proxy: ProxyProcess, name: str) -> int:
    return int(cache_stats(proxy).get(name, "0"))


def connect(proxy: ProxyProcess, dbname: str, **kwargs) -> psycopg.Connection:
    """A psycopg 3 autocommit connection through the proxy; by default it never prepares statements, so a text
    is always sent as the same messages (a prepared one omits Describe: another request, another entry)."""
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(proxy.dsn(dbname), autocommit=True, connect_timeout=10, **kwargs)


def until_hit(proxy: ProxyProcess, run, timeout: float = 20.0):
    """Call run() until the proxy counts a cache hit during a call (the first sights of a text are analysed in
    the background, the next fills); the answer of that call, or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        before = hits(proxy)
        answer = run()
        if hits(proxy) > before:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"no cache hit in {timeout}s; SHOW CACHE: {cache_stats(proxy)}\n{proxy.log()[-3000:]}")
        time.sleep(0.05)


def wait_serving(proxy: ProxyProcess, timeout: float = 20.0) -> None:
    """Until the cache answers lookups (the change feed's slot exists and Redis is consistent)."""
    deadline = time.monotonic() + timeout
    while cache_stats(proxy)["serving"] != "true":
        if time.monotonic() > deadline:
            raise AssertionError(f"the cache is not serving after {timeout}s: {cache_stats(proxy)}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def module_proxy(pg, redis_server, module_db):
    """One caching proxy in front of `module_db` for a whole module (starting one costs about a second)."""
    proxy = ProxyProcess(proxy_config(pg, module_db, redis_server.url)).start()
    wait_serving(proxy)
    yield proxy
    proxy.stop()
