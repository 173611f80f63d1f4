"""TLS between clients and the proxy: verified certificates, channel binding, and no plaintext smuggled past the upgrade."""
from __future__ import annotations

import asyncio
import ssl

import asyncpg
import pytest

from tests.security.conftest import PASSWORD, psql, scram_secret
from tests.support.wire import RawConnection, SSL_REQUEST_CODE, ServerClosed, error_fields, special_request, \
    startup_packet


@pytest.fixture
def tls_proxy(proxy_factory, fresh_db, auth_file, tls_files):
    return proxy_factory(dbname=fresh_db, auth={"auth_file": auth_file({"alice": scram_secret()})},
                         tls={"client_mode": "require", "client_cert_file": tls_files["cert"],
                              "client_key_file": tls_files["key"]})


def test_psql_verifies_the_proxy_certificate_and_connects_over_tls(tls_proxy, fresh_db, tls_files):
    out = psql(tls_proxy, fresh_db, r"\conninfo", user="alice", password=PASSWORD,
               sslmode="verify-full", sslrootcert=tls_files["ca"])

    assert out.returncode == 0, out.stderr
    assert "SSL connection (protocol: TLSv1." in out.stdout


def test_psql_refuses_a_proxy_certificate_from_another_ca(tls_proxy, fresh_db, tls_files):
    out = psql(tls_proxy, fresh_db, "SELECT 1", user="alice", password=PASSWORD,
               sslmode="verify-full", sslrootcert=tls_files["other_ca"])

    assert out.returncode != 0
    assert "certificate verify failed" in out.stderr


def test_scram_over_tls_binds_to_the_channel(tls_proxy, fresh_db, tls_files):
    # channel_binding=require: libpq insists on SCRAM-SHA-256-PLUS with the proxy's tls-server-end-point.
    out = psql(tls_proxy, fresh_db, "SELECT 'bound'", user="alice", password=PASSWORD,
               sslmode="verify-full", sslrootcert=tls_files["ca"], channel_binding="require")

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bound"


def test_asyncpg_logs_in_over_tls_without_channel_binding(tls_proxy, fresh_db, tls_files):
    ctx = ssl.create_default_context(cafile=tls_files["ca"])

    async def scenario():
        conn = await asyncpg.connect(host=tls_proxy.host, port=tls_proxy.port, user="alice", password=PASSWORD,
                                     database=fresh_db, ssl=ctx, timeout=10)
        try:
            return await conn.fetchval("SELECT 'asyncpg over tls'")
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == "asyncpg over tls"


def test_bytes_sent_after_an_ssl_request_before_the_handshake_are_refused(tls_proxy, fresh_db):
    with RawConnection(tls_proxy.host, tls_proxy.port) as conn:
        # A man in the middle appending plaintext to the client's SSLRequest (CVE-2021-23214).
        conn.send(special_request(SSL_REQUEST_CODE) + startup_packet("alice", fresh_db))
        kind, body = conn.read_message()
        with pytest.raises(ServerClosed):
            conn.read_message()

    assert kind == b"E"
    assert error_fields(body)["C"] == "08P01"


def test_a_failed_handshake_closes_only_that_connection(tls_proxy, fresh_db, tls_files):
    with RawConnection(tls_proxy.host, tls_proxy.port) as conn:
        conn.send(special_request(SSL_REQUEST_CODE))
        answer = conn.read_byte()
        conn.send(b"this is not a TLS ClientHello" * 4)
        with pytest.raises(ServerClosed):
            conn.read_message()
    after = psql(tls_proxy, fresh_db, "SELECT 'still serving'", user="alice", password=PASSWORD,
                 sslmode="verify-full", sslrootcert=tls_files["ca"])

    assert answer == b"S"
    assert after.stdout.strip() == "still serving", after.stderr
