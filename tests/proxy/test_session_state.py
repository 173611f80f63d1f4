"""Session settings in transaction mode: a client's SETs follow it from backend to backend and reach no one else."""
from __future__ import annotations

import psycopg
import pytest

from tests.proxy.helpers import backend_pid, connect, holding_backend

POOL_SIZE = 2


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=POOL_SIZE, timeouts={"query_wait": 3})


@pytest.fixture
def defaults(pg, module_db) -> dict[str, str]:
    with psycopg.connect(pg.dsn_for(module_db)) as direct:
        return {name: direct.execute(f"SHOW {name}").fetchone()[0] for name in ("search_path", "TimeZone")}


def show(conn: psycopg.Connection, name: str) -> str:
    return conn.execute(f"SHOW {name}").fetchone()[0]


def test_set_search_path_follows_the_client_to_another_backend(proxy, module_db, pg):
    pg.psql("CREATE SCHEMA app; CREATE TABLE app.marker AS SELECT 'app schema' AS v", dbname=module_db)
    with connect(proxy, module_db) as client:
        client.execute("SET search_path TO app, public")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            new_pid = backend_pid(client)
            path = show(client, "search_path")
            marker = client.execute("SELECT v FROM marker").fetchone()[0]

    assert new_pid != pid
    assert path == "app, public"
    assert marker == "app schema"


def test_set_timezone_follows_the_client_to_another_backend(proxy, module_db):
    with connect(proxy, module_db) as client:
        client.execute("SET TimeZone TO 'Asia/Tokyo'")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            new_pid = backend_pid(client)
            zone = show(client, "TimeZone")
            rendered = client.execute("SELECT '2020-01-01 00:00:00+00'::timestamptz::text").fetchone()[0]

    assert new_pid != pid
    assert zone == "Asia/Tokyo"
    assert rendered == "2020-01-01 09:00:00+09"


def test_session_settings_do_not_leak_to_the_client_that_reuses_the_backend(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        client.execute("SET search_path TO pg_catalog")
        client.execute("SET TimeZone TO 'America/Lima'")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            seen = {name: show(holder, name) for name in defaults}

    assert seen == defaults


def test_session_settings_do_not_leak_to_a_new_client(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        client.execute("SET search_path TO pg_catalog")
        client.execute("SET TimeZone TO 'America/Lima'")
        with connect(proxy, module_db) as newcomer:
            during = {name: show(newcomer, name) for name in defaults}
    with connect(proxy, module_db) as newcomer:
        after = {name: show(newcomer, name) for name in defaults}

    assert during == defaults
    assert after == defaults


def test_reset_brings_back_the_default_on_the_next_backend(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        client.execute("SET TimeZone TO 'Asia/Tokyo'")
        client.execute("SET search_path TO pg_catalog")
        client.execute("RESET TimeZone")
        client.execute("RESET search_path")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            seen = {name: show(client, name) for name in defaults}

    assert seen == defaults


def test_set_local_ends_with_its_transaction(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        with client.transaction():
            client.execute("SET LOCAL TimeZone TO 'Asia/Tokyo'")
            inside = show(client, "TimeZone")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            after = show(client, "TimeZone")

    assert inside == "Asia/Tokyo"
    assert after == defaults["TimeZone"]


def test_set_in_a_rolled_back_transaction_is_undone(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        client.execute("BEGIN")
        client.execute("SET TimeZone TO 'Asia/Tokyo'")
        client.execute("ROLLBACK")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            after = show(client, "TimeZone")

    assert after == defaults["TimeZone"]


def test_startup_application_name_follows_the_client_to_another_backend(proxy, module_db):
    with connect(proxy, module_db, application_name="billing-worker") as client:
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            name = show(client, "application_name")
            holder_name = show(holder, "application_name")

    assert name == "billing-worker"
    assert holder_name != "billing-worker"


def test_set_config_does_not_leak_to_other_clients(proxy, module_db, defaults):
    # The proxy may replay set_config() elsewhere or pin the client; either way no one else may see it.
    with connect(proxy, module_db) as client:
        client.execute("SELECT set_config('search_path', 'pg_catalog', false)")
        client.execute("SELECT set_config('TimeZone', 'America/Lima', false)")
        others = [connect(proxy, module_db, autocommit=False) for _ in range(POOL_SIZE - 1)]
        try:
            seen = [{name: show(other, name) for name in defaults} for other in others]
        finally:
            for other in others:
                other.close()
        mine = {name: show(client, name) for name in defaults}

    assert seen == [defaults] * (POOL_SIZE - 1)
    assert mine == {"search_path": "pg_catalog", "TimeZone": "America/Lima"}


def test_set_role_follows_the_client_and_does_not_leak(proxy, module_db, pg):
    pg.psql("DO $$ BEGIN CREATE ROLE reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            dbname=module_db)
    with connect(proxy, module_db) as client:
        client.execute("SET ROLE reader")
        pid = backend_pid(client)
        with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            holder_user = holder.execute("SELECT current_user").fetchone()[0]
            client_user = client.execute("SELECT current_user").fetchone()[0]

    assert holder_user == "postgres"
    assert client_user == "reader"
