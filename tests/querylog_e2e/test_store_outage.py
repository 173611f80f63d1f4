"""The log store stopped in the middle of a pgbench run: clients notice nothing, and no event goes unaccounted.

The store is a private cluster (`query_log.dsn`) apart from the cluster pgbench works on. pgbench runs the
TPC-B script for RUN_SECONDS; OUTAGE_STARTS_AT seconds in, the store is stopped for OUTAGE_SECONDS, then started
again. Once it is back, every statement pgbench ran (7 per transaction, plus its 2 setup queries) is in the
store, replayed from the spool, or counted on /metrics in pgpilot_querylog_rows_dropped.

The acceptance criterion speaks of a 30 s outage in a 60 s run; the test uses shorter times to stay small, and
`python -m bench.querylog_overhead --store-outage 30` runs the long version.
"""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.querylog_e2e.conftest import count_events
from tests.querylog_e2e.pgbench_log import (
    client_env, parse_pgbench, pgbench_command, querylog_metrics, wait_for_log,
)
from tests.support.services import PgCluster

RUN_SECONDS = 20
OUTAGE_STARTS_AT = 5
OUTAGE_SECONDS = 10
APP = "pgbench-outage"


@pytest.fixture
def store_cluster():
    """A private cluster the test may stop and start."""
    cluster = PgCluster().start()
    cluster.psql("CREATE DATABASE store")
    yield cluster
    cluster.destroy()


def test_store_stopped_during_pgbench_loses_no_event_and_no_transaction(
        pg, bench_db, store_cluster, proxy_factory, tmp_path):
    store_dsn = store_cluster.dsn_for("store")
    proxy = proxy_factory(dbname=bench_db, pool_size=4, query_log={
        "enabled": True, "dsn": store_dsn, "flush_interval": 0.05, "spool_dir": str(tmp_path / "spool"),
        "write_timeout": 2.0, "reconnect_max_backoff": 0.5})
    client = subprocess.Popen(
        pgbench_command(proxy.host, proxy.port, bench_db, "-M", "prepared", "-c", "4", "-j", "2",
                        "-T", str(RUN_SECONDS)),
        env=client_env(APP), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Read pgbench's output meanwhile, so a full pipe can never stall it.
    output: dict[str, str] = {}
    reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), client.communicate())))
    reader.start()
    try:
        time.sleep(OUTAGE_STARTS_AT)
        store_cluster.stop()
        spooled_during_outage = querylog_metrics(proxy)["rows_spooled"]
        time.sleep(OUTAGE_SECONDS)
        spooled_during_outage = querylog_metrics(proxy)["rows_spooled"] - spooled_during_outage
        store_cluster.start()
    finally:
        reader.join(RUN_SECONDS + 120)
        if reader.is_alive():
            client.kill()
            reader.join()
    result = parse_pgbench(client.returncode, output["stdout"], output["stderr"])
    metrics = wait_for_log(proxy, lambda: count_events(store_dsn, bench_db, APP))
    stored = count_events(store_dsn, bench_db, APP)

    assert result.returncode == 0 and result.failed == 0, result.report() + proxy.log()[-3000:]
    assert spooled_during_outage > 0                     # events kept coming while the store was away
    assert metrics["rows_replayed"] > 0
    assert stored + metrics["rows_dropped"] == 7 * result.processed + 2
