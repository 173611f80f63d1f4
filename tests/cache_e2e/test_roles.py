"""Roles through the cache: a result cached for one role never reaches a role without the grant, a lost grant
stops the hits, and tables with row-level security are never served from the cache.

The proxy connects upstream as one user; the tests act as other roles with `SET ROLE` (a session setting the
proxy tracks and keys the cache on), with roles the superuser creates on the test cluster.
"""
from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from tests.cache_e2e.conftest import cache_stats, connect, hits, proxy_config, until_hit, wait_serving
from tests.support.proxy import ProxyProcess

READ = "SELECT v FROM secret WHERE id = 1"


@pytest.fixture(scope="module")
def module_proxy(pg, redis_server, module_db):
    """A caching proxy with one backend: every client of the module shares it, as clients share backends under
    load, so whatever one role's session leaves on it is met by the next client."""
    proxy = ProxyProcess(proxy_config(pg, module_db, redis_server.url, pool_size=1)).start()
    wait_serving(proxy)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def roles(pg):
    """Two roles, (a, b), and a group role, named uniquely: roles belong to the whole shared cluster."""
    suffix = uuid.uuid4().hex[:8]
    a, b, group = f"ra_{suffix}", f"rb_{suffix}", f"rg_{suffix}"
    pg.psql(f"CREATE ROLE {a}; CREATE ROLE {b}; CREATE ROLE {group}")
    yield a, b, group
    for role in (a, b, group):
        pg.psql(f"DROP OWNED BY {role} CASCADE", check=False)
    pg.psql(f"DROP ROLE IF EXISTS {a}, {b}, {group}", check=False)


@pytest.fixture
def secret(pg, module_db, roles):
    """A table only role a may read."""
    a, _, _ = roles
    pg.psql(f"DROP TABLE IF EXISTS secret; CREATE TABLE secret (id int PRIMARY KEY, v text);"
            f"INSERT INTO secret VALUES (1, 'classified'); GRANT SELECT ON secret TO {a}", dbname=module_db)
    yield "secret"
    pg.psql("DROP TABLE IF EXISTS secret", dbname=module_db, check=False)


def as_role(proxy, dbname: str, role: str) -> psycopg.Connection:
    conn = connect(proxy, dbname)
    conn.execute(f"SET ROLE {role}")
    return conn


def errors_of(conn, sql: str, times: int = 3) -> list[str | None]:
    """The SQLSTATE of each of `times` runs of sql (None for a success)."""
    codes = []
    for _ in range(times):
        try:
            conn.execute(sql).fetchall()
            codes.append(None)
        except psycopg.Error as e:
            codes.append(e.sqlstate)
    return codes


def until_error(conn, sql: str, timeout: float = 15.0) -> tuple[str | None, int]:
    """Run sql until it fails: (SQLSTATE, successful runs before it), or (None, runs) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    runs = 0
    while time.monotonic() < deadline:
        try:
            conn.execute(sql).fetchall()
            runs += 1
        except psycopg.Error as e:
            return e.sqlstate, runs
        time.sleep(0.01)
    return None, runs


def test_a_role_without_the_grant_gets_the_permission_error_for_a_result_another_role_cached(
        module_proxy, module_db, roles, secret):
    a, b, _ = roles
    with as_role(module_proxy, module_db, a) as conn_a, as_role(module_proxy, module_db, b) as conn_b:
        cached = until_hit(module_proxy, lambda: conn_a.execute(READ).fetchall())
        before = hits(module_proxy)
        codes_b = errors_of(conn_b, READ)
        hits_during_b = hits(module_proxy) - before
        still_a = conn_a.execute(READ).fetchall()
    assert cached == still_a == [("classified",)]
    assert codes_b == ["42501"] * 3 and hits_during_b == 0


def test_a_revoke_through_the_proxy_stops_the_hits_at_once(module_proxy, module_db, roles, secret):
    a, _, _ = roles
    with as_role(module_proxy, module_db, a) as conn_a, connect(module_proxy, module_db) as admin:
        until_hit(module_proxy, lambda: conn_a.execute(READ).fetchall())
        revoking_as = admin.execute("SELECT current_user").fetchone()[0]
        admin.execute(f"REVOKE SELECT ON secret FROM {a}")
        before = hits(module_proxy)
        codes = errors_of(conn_a, READ)
    assert revoking_as == "postgres", "the REVOKE ran as another client's role: SET ROLE leaked through the pool"
    assert codes == ["42501"] * 3 and hits(module_proxy) == before


def test_a_revoke_on_postgres_directly_stops_the_hits_once_the_catalog_change_is_seen(
        pg, module_proxy, module_db, roles, secret):
    a, _, _ = roles
    with as_role(module_proxy, module_db, a) as conn_a:
        until_hit(module_proxy, lambda: conn_a.execute(READ).fetchall())
        pg.psql(f"REVOKE SELECT ON secret FROM {a}", dbname=module_db)
        code, served_after_revoke = until_error(conn_a, READ)
        before = hits(module_proxy)
        codes = errors_of(conn_a, READ)
    assert code == "42501", f"role {a} still reads the table {served_after_revoke} times after the REVOKE"
    assert codes == ["42501"] * 3 and hits(module_proxy) == before


def test_a_membership_revoked_on_postgres_directly_stops_the_hits(pg, module_proxy, module_db, roles, secret):
    a, _, group = roles
    pg.psql(f"REVOKE SELECT ON secret FROM {a}; GRANT SELECT ON secret TO {group}; GRANT {group} TO {a}",
            dbname=module_db)
    with as_role(module_proxy, module_db, a) as conn_a:
        cached = until_hit(module_proxy, lambda: conn_a.execute(READ).fetchall())
        pg.psql(f"REVOKE {group} FROM {a}", dbname=module_db)     # a shared catalog: seen by the catalog timer
        code, served_after_revoke = until_error(conn_a, READ)
        before = hits(module_proxy)
        codes = errors_of(conn_a, READ)
    assert cached == [("classified",)]
    assert code == "42501", f"role {a} still reads the table {served_after_revoke} times after losing {group}"
    assert codes == ["42501"] * 3 and hits(module_proxy) == before


def test_a_table_with_row_level_security_is_never_served_from_the_cache(pg, module_proxy, module_db, roles):
    a, b, _ = roles
    pg.psql(f"""
        DROP TABLE IF EXISTS docs;
        CREATE TABLE docs (id int PRIMARY KEY, owner name NOT NULL, body text);
        INSERT INTO docs VALUES (1, '{a}', 'for a'), (2, '{b}', 'for b');
        ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
        CREATE POLICY own ON docs USING (owner = current_user);
        GRANT SELECT ON docs TO {a}, {b};
    """, dbname=module_db)
    sql = "SELECT body FROM docs ORDER BY id"
    try:
        before = cache_stats(module_proxy)
        with as_role(module_proxy, module_db, a) as conn_a, as_role(module_proxy, module_db, b) as conn_b, \
                as_role(module_proxy, module_db, "postgres") as owner:
            seen = []
            for _ in range(5):
                seen.append((conn_a.execute(sql).fetchall(), conn_b.execute(sql).fetchall(),
                             owner.execute(sql).fetchall()))
                time.sleep(0.2)
            settled = cache_stats(module_proxy)
            last = (conn_a.execute(sql).fetchall(), conn_b.execute(sql).fetchall(), owner.execute(sql).fetchall())
            after = cache_stats(module_proxy)
    finally:
        pg.psql("DROP TABLE IF EXISTS docs", dbname=module_db, check=False)
    # Once analysed, every role's read is refused for the reason "rls"; none was ever answered from the cache.
    assert seen + [last] == [([("for a",)], [("for b",)], [("for a",), ("for b",)])] * 6
    assert int(after["hits"]) == int(before["hits"])
    assert int(after.get("uncacheable:rls", 0)) - int(settled.get("uncacheable:rls", 0)) == 3
