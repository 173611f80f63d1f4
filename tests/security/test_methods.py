"""md5 logins, hba-style rules (first match wins, reject, trust, no match) and the brake on repeated failures."""
from __future__ import annotations

import subprocess
import sys

import psycopg

from tests.security.client import login
from tests.security.conftest import PASSWORD, md5_hash, proxy_backends, psql, scram_secret
from tests.support.proxy import REPO, ProxyProcess, upstream_entry


def test_md5_login_works_with_an_md5_secret(proxy_factory, fresh_db, auth_file):
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_file": auth_file({"bob": md5_hash("bob")}),
                                                 "hba": [{"method": "md5"}]})

    with psycopg.connect(proxy.dsn(fresh_db, user="bob"), password=PASSWORD, require_auth="md5",
                         autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 'md5'").fetchone()[0] == "md5"


def test_md5_refuses_a_wrong_password(proxy_factory, fresh_db, auth_file):
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_file": auth_file({"bob": md5_hash("bob")}),
                                                 "hba": [{"method": "md5"}]})

    refused = login(proxy, "bob", fresh_db, password="not-it")

    assert refused["C"] == "28P01"


def test_an_md5_rule_upgrades_to_scram_for_a_scram_secret(proxy_factory, fresh_db, auth_file):
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_file": auth_file({"carol": scram_secret()}),
                                                 "hba": [{"method": "md5"}]})

    with psycopg.connect(proxy.dsn(fresh_db, user="carol"), password=PASSWORD, require_auth="scram-sha-256",
                         autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def hba_proxy(proxy_factory, fresh_db, auth_file, rules):
    path = auth_file({"alice": scram_secret(), "mallory": scram_secret()})
    return proxy_factory(dbname=fresh_db, auth={"auth_file": path, "hba": rules})


def test_a_reject_rule_refuses_the_users_it_names(proxy_factory, pg, fresh_db, auth_file):
    proxy = hba_proxy(proxy_factory, fresh_db, auth_file,
                      [{"user": "mallory", "method": "reject"}, {"method": "scram-sha-256"}])

    refused = login(proxy, "mallory", fresh_db, password=PASSWORD)
    other = login(proxy, "alice", fresh_db, password=PASSWORD)

    assert refused["C"] == "28000"
    assert refused["M"] == f'pg_hba.conf rejects connection for host "127.0.0.1", user "mallory", ' \
                           f'database "{fresh_db}", no encryption'
    assert other is None


def test_a_client_no_rule_matches_is_refused(proxy_factory, pg, fresh_db, auth_file):
    proxy = hba_proxy(proxy_factory, fresh_db, auth_file, [{"address": "10.0.0.0/8", "method": "trust"}])

    refused = login(proxy, "alice", fresh_db, password=PASSWORD)

    assert refused["C"] == "28000"
    assert refused["M"].startswith('no pg_hba.conf entry for host "127.0.0.1", user "alice"')
    assert proxy_backends(pg, fresh_db) == 0


def test_a_trust_rule_lets_only_its_users_in_without_a_password(proxy_factory, fresh_db, auth_file):
    proxy = hba_proxy(proxy_factory, fresh_db, auth_file,
                      [{"user": "app", "address": "127.0.0.0/8", "method": "trust"}, {"method": "scram-sha-256"}])

    trusted = psql(proxy, fresh_db, "SELECT 'trusted'", user="app")
    others = psql(proxy, fresh_db, "SELECT 1", user="alice")

    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.strip() == "trusted"
    assert "no password supplied" in others.stderr


def test_a_hostssl_rule_does_not_match_a_plaintext_client(proxy_factory, fresh_db, auth_file, tls_files):
    path = auth_file({"alice": scram_secret()})
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_file": path, "hba": [{"type": "hostssl", "method": "scram-sha-256"}]},
                          tls={"client_mode": "allow", "client_cert_file": tls_files["cert"],
                               "client_key_file": tls_files["key"]})

    plaintext = psql(proxy, fresh_db, "SELECT 1", user="alice", password=PASSWORD, sslmode="disable")
    encrypted = psql(proxy, fresh_db, "SELECT 'tls'", user="alice", password=PASSWORD, sslmode="require")

    assert "no pg_hba.conf entry" in plaintext.stderr and "no encryption" in plaintext.stderr
    assert encrypted.returncode == 0, encrypted.stderr


def test_repeated_failures_from_one_address_lock_it_out_but_not_others(proxy_factory, fresh_db, auth_file):
    proxy = proxy_factory(dbname=fresh_db, auth={"auth_file": auth_file({"alice": scram_secret()}),
                                                 "max_failures": 3, "failure_window": 60, "lockout": 60})

    failures = [login(proxy, "alice", fresh_db, password="guess", source_ip="127.0.0.2")["C"] for _ in range(3)]
    locked_out = login(proxy, "alice", fresh_db, password=PASSWORD, source_ip="127.0.0.2")
    elsewhere = login(proxy, "alice", fresh_db, password=PASSWORD, source_ip="127.0.0.1")

    assert failures == ["28P01"] * 3
    assert locked_out["C"] == "28000"
    assert locked_out["M"].startswith("too many failed login attempts")
    assert elsewhere is None


def test_the_proxy_does_not_start_with_an_unreadable_auth_file(tmp_path, pg):
    proxy = ProxyProcess({"databases": {pg.dbname: upstream_entry(pg)},
                          "auth": {"auth_file": str(tmp_path / "missing.txt")}})
    proxy.write_config()

    run = subprocess.run([sys.executable, "-m", "pgpilot", "serve", "-c", str(proxy.config_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)

    assert run.returncode == 1
    assert "missing.txt" in run.stderr
