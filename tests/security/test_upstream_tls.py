"""TLS from the proxy to the upstream: sslmode verify-full against a cluster with ssl=on, seen encrypted in pg_stat_ssl."""
from __future__ import annotations

import os
import shutil

import psycopg
import pytest

from tests.proxy.helpers import backend_pid
from tests.support.proxy import upstream_entry
from tests.support.services import PgCluster


@pytest.fixture(scope="module")
def ssl_pg(tls_files):
    """A private cluster with ssl=on, serving the test CA's certificate for 127.0.0.1, refusing plaintext clients."""
    cluster = PgCluster(settings={"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}).init()
    (cluster.datadir / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 trust\n"
                                                 "hostnossl all all 127.0.0.1/32 reject\n")
    for name, source in (("server.crt", tls_files["cert"]), ("server.key", tls_files["key"])):
        target = cluster.datadir / name
        shutil.copyfile(source, target)
        target.chmod(0o600)
        if os.geteuid() == 0:   # the cluster runs as the postgres system user, which must own its key
            shutil.chown(target, "postgres", "postgres")
    cluster.start()
    yield cluster
    cluster.destroy()


def test_verify_full_reaches_the_upstream_over_tls(proxy_factory, ssl_pg, tls_files):
    proxy = proxy_factory(databases={"postgres": upstream_entry(
        ssl_pg, "postgres", sslmode="verify-full", sslrootcert=tls_files["ca"])})

    with psycopg.connect(proxy.dsn("postgres"), autocommit=True, connect_timeout=10) as conn:
        pid = backend_pid(conn)
    with psycopg.connect(ssl_pg.dsn, sslmode="require", autocommit=True) as direct:
        encrypted = direct.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = %s", [pid]).fetchone()

    assert encrypted[0] is True
    assert encrypted[1].startswith("TLSv1.")


def test_an_upstream_certificate_from_another_ca_is_refused(proxy_factory, ssl_pg, tls_files):
    proxy = proxy_factory(databases={"postgres": upstream_entry(
        ssl_pg, "postgres", sslmode="verify-full", sslrootcert=tls_files["other_ca"])})

    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.dsn("postgres"), connect_timeout=10)

    assert "certificate verify failed" in str(refused.value)


def test_allow_retries_with_tls_when_the_upstream_refuses_plaintext(proxy_factory, ssl_pg):
    proxy = proxy_factory(databases={"postgres": upstream_entry(ssl_pg, "postgres", sslmode="allow")})

    with psycopg.connect(proxy.dsn("postgres"), autocommit=True, connect_timeout=10) as conn:
        pid = backend_pid(conn)
    with psycopg.connect(ssl_pg.dsn, sslmode="require", autocommit=True) as direct:
        encrypted = direct.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = %s", [pid]).fetchone()[0]

    assert encrypted is True


def test_require_refuses_an_upstream_without_tls(proxy_factory, pg):
    proxy = proxy_factory(databases={pg.dbname: upstream_entry(pg, sslmode="require")})

    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.dsn(pg.dbname), connect_timeout=10)

    assert "does not support SSL" in str(refused.value)


def test_prefer_falls_back_to_plaintext_when_the_upstream_has_no_tls(proxy_factory, pg):
    proxy = proxy_factory(databases={pg.dbname: upstream_entry(pg, sslmode="prefer")})

    with psycopg.connect(proxy.dsn(pg.dbname), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 'plain upstream'").fetchone()[0] == "plain upstream"
