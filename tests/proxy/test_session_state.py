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


def test_set_role_follows_the_client_and_does_not_leak(fresh_db, pg, proxy_factory):
    # A proxy of its own: a leaked role would change what later tests in this module see.
    proxy = proxy_factory(dbname=fresh_db, pool_size=POOL_SIZE, timeouts={"query_wait": 3})
    pg.psql("DO $$ BEGIN CREATE ROLE pgpilot_test_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            dbname=fresh_db)
    with connect(proxy, fresh_db) as client:
        client.execute("SET ROLE pgpilot_test_reader")
        pid = backend_pid(client)
        with holding_backend(proxy, fresh_db, pid, POOL_SIZE) as holder:
            assert holder is not None, "the client's backend was never handed to another client"
            holder_user = holder.execute("SELECT current_user").fetchone()[0]
            client_user = client.execute("SELECT current_user").fetchone()[0]

    assert holder_user == "postgres"
    assert client_user == "pgpilot_test_reader"


def on_another_backend(proxy, module_db, client, sql: str) -> tuple[str, int, int]:
    """Run `sql` for the client after forcing it off its current backend: (first column, old pid, new pid)."""
    pid = backend_pid(client)
    with holding_backend(proxy, module_db, pid, POOL_SIZE) as holder:
        assert holder is not None, "the client's backend was never handed to another client"
        value, new_pid = client.execute(f"SELECT ({sql})::text, pg_backend_pid()").fetchone()
    return value, pid, new_pid


@pytest.mark.parametrize("statement", [
    "SET search_path TO app, public",
    "SET search_path = app, public",
    "set SESSION search_path to app,public",
    "SET search_path TO 'app', 'public'",
    "BEGIN; SET search_path TO app, public; COMMIT",
    "SET TimeZone TO 'UTC'; SET search_path TO app, public",
])
def test_every_spelling_of_set_follows_the_client(proxy, module_db, pg, statement):
    pg.psql("CREATE SCHEMA IF NOT EXISTS app", dbname=module_db)
    with connect(proxy, module_db) as client:
        client.execute(statement)
        value, old_pid, new_pid = on_another_backend(proxy, module_db, client, "current_schemas(false)")

    assert new_pid != old_pid
    assert value == "{app,public}"


def test_set_time_zone_syntax_follows_the_client(proxy, module_db):
    with connect(proxy, module_db) as client:
        client.execute("SET TIME ZONE 'Asia/Tokyo'")
        value, old_pid, new_pid = on_another_backend(proxy, module_db, client, "current_setting('TimeZone')")

    assert new_pid != old_pid
    assert value == "Asia/Tokyo"


def test_set_undone_by_a_failing_multi_statement_query_is_not_replayed(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        with pytest.raises(psycopg.errors.DivisionByZero):
            client.execute("SET search_path TO pg_catalog; SELECT 1/0")
        value, _, _ = on_another_backend(proxy, module_db, client, "current_setting('search_path')")

    assert value == defaults["search_path"]


def test_set_rolled_back_to_a_savepoint_is_undone(proxy, module_db, defaults):
    with connect(proxy, module_db) as client:
        with client.transaction():
            client.execute("SAVEPOINT before")
            client.execute("SET search_path TO pg_catalog")
            client.execute("ROLLBACK TO SAVEPOINT before")
        value, _, _ = on_another_backend(proxy, module_db, client, "current_setting('search_path')")

    assert value == defaults["search_path"]


@pytest.mark.parametrize("reset", ["DISCARD ALL", "RESET ALL"])
def test_discarding_all_settings_is_not_undone_on_the_next_backend(proxy, module_db, defaults, reset):
    with connect(proxy, module_db) as client:
        client.execute("SET search_path TO pg_catalog")
        client.execute("SET TimeZone TO 'Asia/Tokyo'")
        client.execute(reset)
        path, _, _ = on_another_backend(proxy, module_db, client, "current_setting('search_path')")
        zone = show(client, "TimeZone")

    assert path == defaults["search_path"]
    assert zone == defaults["TimeZone"]
