"""Client-side helpers for the proxy acceptance tests: connections, and forcing a client onto another backend."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg


def connect(proxy, dbname: str, autocommit: bool = True, **kwargs) -> psycopg.Connection:
    """A psycopg 3 connection through the proxy."""
    return psycopg.connect(proxy.dsn(dbname), autocommit=autocommit, connect_timeout=10, **kwargs)


def backend_pid(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


@contextlib.contextmanager
def holding_backend(proxy, dbname: str, pid: int, pool_size: int) -> Iterator[psycopg.Connection | None]:
    """Occupy the backend `pid` with another client's open transaction, so its last user must go elsewhere.

    Opens up to `pool_size` holders one at a time (each in an open transaction) until one lands on `pid`,
    releases the others and yields that holder; yields None if no holder got it (the backend was kept
    from the pool, for example because its client is pinned to it).
    """
    holders: list[psycopg.Connection] = []
    keeper = None
    try:
        for _ in range(pool_size):
            conn = connect(proxy, dbname, autocommit=False)
            holders.append(conn)
            try:
                holder_pid = backend_pid(conn)
            except psycopg.Error:  # the pool is exhausted: `pid` is not available to others
                break
            if holder_pid == pid:
                keeper = conn
                break
        for conn in holders:
            if conn is not keeper:
                conn.rollback()
                conn.close()
        yield keeper
    finally:
        for conn in holders:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
                conn.close()
