"""Flow control: a client that stops reading a large result does not make the proxy buffer it all."""
from __future__ import annotations

import time

import psutil

from tests.support.wire import RawConnection, query

RESULT_MB = 128


def test_slow_reader_does_not_make_the_proxy_buffer_the_whole_result(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=2)
    process = psutil.Process(proxy.proc.pid)
    with RawConnection(proxy.host, proxy.port, timeout=120) as conn:
        conn.start("postgres", fresh_db)
        baseline = process.memory_info().rss
        conn.send(query(f"SELECT repeat('x', 1024) FROM generate_series(1, {RESULT_MB * 1024})"))
        conn.read_message()  # the result has started
        time.sleep(2)  # stop reading; Postgres can produce all of it in this time
        stalled = process.memory_info().rss
        rows = sum(1 for kind, _ in conn.read_until_ready() if kind == b"D")

    assert rows == RESULT_MB * 1024
    assert (stalled - baseline) < 64 * 1024 * 1024, f"proxy grew by {(stalled - baseline) >> 20} MB"
