"""Clients log in with SCRAM-SHA-256 through the proxy, with secrets from an auth_file or from the upstream (auth_query)."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import psycopg
import pytest

from tests.security.conftest import PASSWORD, psql, scram_secret


def scram_proxy(proxy_factory, fresh_db, auth_file, secret: str | None = None, **auth):
    path = auth_file({"alice": secret or scram_secret()})
    return proxy_factory(dbname=fresh_db, auth={"auth_file": path, **auth})


def test_psql_logs_in_with_scram_from_an_auth_file(proxy_factory, fresh_db, auth_file):
    proxy = scram_proxy(proxy_factory, fresh_db, auth_file)

    out = psql(proxy, fresh_db, "SELECT current_database()", user="alice", password=PASSWORD)

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == fresh_db


def test_psql_without_a_password_is_asked_for_one(proxy_factory, fresh_db, auth_file):
    proxy = scram_proxy(proxy_factory, fresh_db, auth_file)

    out = psql(proxy, fresh_db, "SELECT 1", user="alice")

    assert out.returncode != 0
    assert "no password supplied" in out.stderr


def test_psycopg_logs_in_and_the_exchange_is_scram(proxy_factory, fresh_db, auth_file):
    proxy = scram_proxy(proxy_factory, fresh_db, auth_file)

    # require_auth makes libpq refuse any other method the server might ask for.
    with psycopg.connect(proxy.dsn(fresh_db, user="alice"), password=PASSWORD, require_auth="scram-sha-256",
                         autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone()[0] == 42


def test_asyncpg_logs_in_with_scram(proxy_factory, fresh_db, auth_file):
    proxy = scram_proxy(proxy_factory, fresh_db, auth_file)

    async def scenario():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="alice", password=PASSWORD,
                                     database=fresh_db, ssl=False, timeout=10)
        try:
            return await conn.fetchval("SELECT 'in'")
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == "in"


def test_a_plaintext_auth_file_secret_serves_scram_too(proxy_factory, fresh_db, auth_file):
    proxy = scram_proxy(proxy_factory, fresh_db, auth_file, secret=PASSWORD)

    out = psql(proxy, fresh_db, "SELECT 'plain'", user="alice", password=PASSWORD)

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "plain"


@pytest.fixture
def scram_role(pg):
    """A role on the upstream whose password Postgres stores as a SCRAM-SHA-256 verifier."""
    name = "r_" + uuid.uuid4().hex[:8]
    pg.psql(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'")
    yield name
    pg.psql(f"DROP ROLE IF EXISTS {name}", check=False)


def test_auth_query_reads_the_upstreams_scram_verifier(proxy_factory, fresh_db, pg, scram_role):
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_user": pg.user})
    stored = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{scram_role}'").strip()

    with psycopg.connect(proxy.dsn(fresh_db, user=scram_role), password=PASSWORD, require_auth="scram-sha-256",
                         autocommit=True, connect_timeout=10) as conn:
        # The proxy logs in upstream as its configured user; the client's name is the proxy's business.
        answer = conn.execute("SELECT 'via auth_query'").fetchone()[0]

    assert stored.startswith("SCRAM-SHA-256$")
    assert answer == "via auth_query"


def test_auth_query_refuses_a_wrong_password(proxy_factory, fresh_db, pg, scram_role):
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_user": pg.user})

    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.dsn(fresh_db, user=scram_role), password="wrong", connect_timeout=10)

    assert f'password authentication failed for user "{scram_role}"' in str(refused.value)
