"""Online configuration changes: SIGHUP and RELOAD under load, new and removed databases, broken files."""
from __future__ import annotations

import re
import signal

import psycopg
import pytest

from tests.ops.conftest import start_pgbench
from tests.ops.helpers import admin_psql, metric_samples, pool_row, wait_until
from tests.proxy.helpers import connect
from tests.support.proxy import upstream_entry


def transactions(proxy, dbname: str) -> float:
    return metric_samples(proxy).get(("pgpilot_transactions_total", (("database", dbname), ("user", "postgres"))), 0)


def test_reload_and_a_broken_sighup_under_pgbench_cause_no_client_errors(bench_db, pg, proxy_factory):
    proxy = proxy_factory(dbname=bench_db, pool_size=4)
    bench = start_pgbench(proxy, bench_db, "-T", "12")
    wait_until(lambda: transactions(proxy, bench_db) > 100, what="pgbench to get going")

    proxy.config["pool_size"] = 6
    proxy.write_config()
    reload = admin_psql(proxy, "RELOAD")
    resized = pool_row(proxy, bench_db)["pool_size"]
    progress = transactions(proxy, bench_db)
    proxy.config_path.write_text(proxy.config_path.read_text().replace("pool_size: 6", "pool_size: -1"))
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: "reload rejected" in proxy.log(), what="the broken config to be rejected")
    wait_until(lambda: transactions(proxy, bench_db) > progress + 100, what="pgbench to carry on")
    out, err = bench.communicate(timeout=120)

    assert reload.returncode == 0, reload.stderr
    assert resized == 6
    assert bench.returncode == 0, out + err
    assert re.search(r"number of failed transactions: 0 ", out), out
    assert "error" not in err.lower(), err
    rejection = next(line for line in proxy.log().splitlines() if "reload rejected" in line)
    assert f"{proxy.config_path}: pool_size" in rejection
    assert pool_row(proxy, bench_db)["pool_size"] == 6
    assert proxy.alive()


def test_sighup_applies_a_new_pool_size(pg, proxy_factory):
    proxy = proxy_factory(pool_size=2)
    proxy.config["pool_size"] = 3
    proxy.write_config()

    proxy.signal(signal.SIGHUP)

    wait_until(lambda: pool_row(proxy, pg.dbname)["pool_size"] == 3, what="the new pool size")


def test_reload_adds_a_database(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(pool_size=2)
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, fresh_db)

    proxy.config["databases"][fresh_db] = upstream_entry(pg, fresh_db)
    proxy.write_config()
    assert admin_psql(proxy, "RELOAD").returncode == 0

    with connect(proxy, fresh_db) as client:
        assert client.execute("SELECT current_database()").fetchone()[0] == fresh_db


def test_removed_database_refuses_new_clients_while_connected_ones_carry_on(pg, fresh_db, proxy_factory):
    proxy = proxy_factory(databases={pg.dbname: upstream_entry(pg), fresh_db: upstream_entry(pg, fresh_db)})
    connected = connect(proxy, fresh_db)
    connected.execute("SELECT 1")

    del proxy.config["databases"][fresh_db]
    proxy.write_config()
    assert admin_psql(proxy, "RELOAD").returncode == 0

    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        connect(proxy, fresh_db)
    assert connected.execute("SELECT 2").fetchone()[0] == 2
    connected.close()


def test_a_lower_per_user_cap_applies_to_new_connections_after_reload(pg, proxy_factory):
    proxy = proxy_factory()
    first = connect(proxy, pg.dbname)

    proxy.config["max_client_conn_per_user"] = 1
    proxy.write_config()
    assert admin_psql(proxy, "RELOAD").returncode == 0

    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        connect(proxy, pg.dbname)
    assert first.execute("SELECT 1").fetchone()[0] == 1
    first.close()
