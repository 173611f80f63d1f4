"""The log store going away: events wait in the spool and are replayed, or are dropped and counted exactly."""
from __future__ import annotations

import asyncio
import socket
import uuid

import psycopg
import pytest

from proxy.querylog import QueryLog
from tests.querylog.conftest import fetch, make_config, make_event
from tests.support.services import PgCluster


@pytest.fixture(scope="module")
def store_cluster():
    """A private cluster the tests may stop and start."""
    cluster = PgCluster().start()
    yield cluster
    cluster.destroy()


def _running(cluster) -> bool:
    try:
        socket.create_connection((cluster.host, cluster.port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def store(store_cluster):
    if not _running(store_cluster):
        store_cluster.start()    # a test that failed half-way may have left it stopped
    name = "t_" + uuid.uuid4().hex[:10]
    store_cluster.psql(f"CREATE DATABASE {name}")
    yield store_cluster, store_cluster.dsn_for(name)


async def _submit_in_waves(log, first_id, waves, per_wave):
    xid = first_id
    for _ in range(waves):
        for _ in range(per_wave):
            log.submit(make_event(f"SELECT * FROM orders WHERE id = {xid}", xid))
            xid += 1
        await asyncio.sleep(0.1)   # lets the writer try the store with what it has
    return xid


def _stored_ids(dsn):
    return [x for (x,) in fetch(dsn, "SELECT xact_id FROM pgpilot.query_events ORDER BY xact_id")]


def test_store_stopped_while_submitting_loses_nothing_with_a_roomy_spool(tmp_path, store):
    cluster, dsn = store

    async def scenario():
        log = QueryLog(make_config(tmp_path), dsn, "p1")
        await log.start()
        next_id = await _submit_in_waves(log, 0, 2, 50)
        assert await log.flush()
        await asyncio.to_thread(cluster.stop)
        next_id = await _submit_in_waves(log, next_id, 6, 50)
        assert await log.flush()
        spooled_while_down = log.spooled
        await asyncio.to_thread(cluster.start)
        assert await log.flush(timeout=60, include_spool=True)
        await log.stop()
        return log, next_id, spooled_while_down

    log, submitted, spooled_while_down = asyncio.run(scenario())
    assert spooled_while_down >= 300
    assert _stored_ids(dsn) == list(range(submitted))
    assert (log.dropped, log.replayed) == (0, log.spooled)


def test_tiny_queue_and_spool_drop_exactly_the_missing_events(tmp_path, store):
    cluster, dsn = store

    async def scenario():
        cfg = make_config(tmp_path, queue_size=100, batch_size=50, spool_max_bytes=8000)
        log = QueryLog(cfg, dsn, "p1")
        await log.start()
        next_id = await _submit_in_waves(log, 0, 1, 50)
        assert await log.flush()
        await asyncio.to_thread(cluster.stop)
        for xid in range(next_id, next_id + 250):                # one burst: 150 over the queue
            log.submit(make_event(f"SELECT * FROM orders WHERE id = {xid}", xid))
        queue_drops = log.dropped
        next_id += 250
        next_id = await _submit_in_waves(log, next_id, 5, 80)    # more than the spool holds
        assert await log.flush()
        await asyncio.to_thread(cluster.start)
        assert await log.flush(timeout=60, include_spool=True)
        await log.stop()
        return log, queue_drops

    log, queue_drops = asyncio.run(scenario())
    stored = _stored_ids(dsn)
    assert queue_drops == 150
    assert log.dropped > queue_drops                        # the spool filled up too
    assert len(stored) + log.dropped == log.submitted == 700
    assert len(set(stored)) == len(stored)                  # and nothing was written twice


def test_a_restarted_proxy_replays_what_its_predecessor_spooled(tmp_path, store):
    cluster, dsn = store
    cfg = make_config(tmp_path)

    async def run(proxy_id, submit):
        log = QueryLog(cfg, dsn, proxy_id)
        await log.start()
        if submit:
            await _submit_in_waves(log, 0, 2, 25)
        else:
            assert await log.flush(timeout=60, include_spool=True)
        await log.stop()
        return log

    cluster.stop()
    first = asyncio.run(run("host:1001", submit=True))
    cluster.start()
    second = asyncio.run(run("host:1002", submit=False))   # a new process: another proxy id
    assert (first.spooled, first.written, first.dropped) == (50, 0, 0)
    assert second.replayed == 50
    assert _stored_ids(dsn) == list(range(50))


def test_a_hanging_store_sends_batches_to_the_spool_until_it_answers(tmp_path, pg, fresh_db):
    dsn = pg.dsn_for(fresh_db)

    async def scenario():
        log = QueryLog(make_config(tmp_path, write_timeout=0.5), dsn, "p1")
        await log.start()
        await _submit_in_waves(log, 0, 1, 10)
        assert await log.flush()
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE pgpilot.query_events IN ACCESS EXCLUSIVE MODE")
            await _submit_in_waves(log, 10, 3, 10)
            assert await log.flush()
            spooled_while_locked = log.spooled
            locker.rollback()
        assert await log.flush(timeout=60, include_spool=True)
        await log.stop()
        return log, spooled_while_locked

    log, spooled_while_locked = asyncio.run(scenario())
    assert spooled_while_locked >= 10
    assert _stored_ids(dsn) == list(range(40))
    assert log.dropped == 0
