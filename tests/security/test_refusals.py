"""Refused logins get Postgres' SQLSTATE and wording, and none of them takes a backend connection."""
from __future__ import annotations

import pytest

from tests.security.client import login
from tests.security.conftest import PASSWORD, proxy_backends, scram_secret


@pytest.fixture
def proxy(proxy_factory, fresh_db, auth_file):
    return proxy_factory(dbname=fresh_db, auth={"auth_file": auth_file({"alice": scram_secret()})})


def test_a_wrong_password_is_refused_with_28P01_before_any_backend_is_opened(proxy, pg, fresh_db):
    refused = login(proxy, "alice", fresh_db, password="not-it")
    backends_after_refusal = proxy_backends(pg, fresh_db)
    let_in = login(proxy, "alice", fresh_db, password=PASSWORD)

    assert refused["S"] == "FATAL"
    assert refused["C"] == "28P01"
    assert refused["M"] == 'password authentication failed for user "alice"'
    assert backends_after_refusal == 0
    assert let_in is None
    assert proxy_backends(pg, fresh_db) >= 1   # the count does see the proxy's backends


def test_an_unknown_user_gets_the_same_answer_as_a_wrong_password(proxy, pg, fresh_db):
    refused = login(proxy, "mallory", fresh_db, password=PASSWORD)

    assert refused["C"] == "28P01"
    assert refused["M"] == 'password authentication failed for user "mallory"'
    assert proxy_backends(pg, fresh_db) == 0


def test_an_unknown_database_is_refused_with_3D000_after_authentication(proxy, pg, fresh_db):
    stranger = login(proxy, "alice", "no_such_db", password="not-it")
    known_user = login(proxy, "alice", "no_such_db", password=PASSWORD)

    assert stranger["C"] == "28P01"   # as in Postgres: whether a database exists is told only to the authenticated
    assert known_user["C"] == "3D000"
    assert known_user["M"] == 'database "no_such_db" does not exist'
    assert proxy_backends(pg, fresh_db) == 0


def test_a_replication_connection_is_refused_with_28000(proxy, pg, fresh_db):
    refused = login(proxy, "alice", fresh_db, password=PASSWORD, replication="database")

    assert refused["C"] == "28000"
    assert proxy_backends(pg, fresh_db) == 0


def test_a_plaintext_client_is_refused_with_28000_when_tls_is_required(proxy_factory, pg, fresh_db, tls_files):
    proxy = proxy_factory(dbname=fresh_db, tls={"client_mode": "require", "client_cert_file": tls_files["cert"],
                                                "client_key_file": tls_files["key"]})

    refused = login(proxy, "postgres", fresh_db)

    assert refused["C"] == "28000"
    assert refused["M"] == f'no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "{fresh_db}", ' \
                           "no encryption"
    assert proxy_backends(pg, fresh_db) == 0
