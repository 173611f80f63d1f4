"""Pure logic of proxy.auth: secrets formats, hba matching and the failed-login brake."""
from __future__ import annotations

import hashlib
import uuid

from proxy.auth import HbaRules, LoginThrottle, ScramVerifier, Secret, md5_secret, parse_userlist
from proxy.config import HbaRule


def test_userlist_lines_are_quoted_pairs_with_doubled_quotes_and_comments_skipped():
    text = '; a comment\n"alice" "md5abc"\n  "we""ird" "pa ss"  extra\n# another\nnot quoted\n"lonely"\n'

    assert parse_userlist(text) == {"alice": "md5abc", 'we"ird': "pa ss"}


def test_a_verifier_derived_here_equals_the_one_postgres_stores(pg):
    role = "v_" + uuid.uuid4().hex[:8]
    pg.psql(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {role} PASSWORD 'pässword'")
    try:
        stored = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'").strip()
    finally:
        pg.psql(f"DROP ROLE {role}")
    parsed = ScramVerifier.parse(stored)

    derived = ScramVerifier.from_password("pässword", parsed.iterations, parsed.salt)

    assert derived == parsed
    assert str(parsed) == stored


def test_secrets_are_told_apart_by_their_form():
    verifier = str(ScramVerifier.from_password("x"))

    assert Secret(verifier).kind == "scram"
    assert Secret(md5_secret("bob", "x")).kind == "md5"
    assert Secret("md5-but-not-a-hash").kind == "plain"
    assert Secret("x").scram_verifier() is not None
    assert Secret(md5_secret("bob", "x")).scram_verifier() is None


def test_an_md5_answer_is_checked_against_a_hash_or_a_plain_password():
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"xbob").hexdigest()
    answer = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()

    assert Secret(md5_secret("bob", "x")).md5_matches("bob", salt, answer)
    assert Secret("x").md5_matches("bob", salt, answer)
    assert not Secret("y").md5_matches("bob", salt, answer)
    assert not Secret(md5_secret("bob", "x")).md5_matches("bob", b"\0\0\0\0", answer)


def rules(*specs: dict) -> HbaRules:
    return HbaRules([HbaRule(**s) for s in specs])


def test_the_first_matching_rule_wins():
    r = rules({"user": "app", "method": "trust"}, {"database": ["a", "b"], "method": "md5"},
              {"method": "scram-sha-256"})

    assert r.method_for("a", "app", "10.1.1.1", False) == "trust"
    assert r.method_for("b", "joe", "10.1.1.1", False) == "md5"
    assert r.method_for("c", "joe", "10.1.1.1", False) == "scram-sha-256"


def test_address_rules_match_by_cidr_and_version_including_ipv4_mapped_addresses():
    r = rules({"address": "10.0.0.0/8", "method": "trust"}, {"address": "::1/128", "method": "md5"})

    assert r.method_for("d", "u", "10.9.8.7", False) == "trust"
    assert r.method_for("d", "u", "::ffff:10.9.8.7", False) == "trust"
    assert r.method_for("d", "u", "::1", False) == "md5"
    assert r.method_for("d", "u", "192.168.0.1", False) is None
    assert r.method_for("d", "u", None, False) is None


def test_hostssl_and_hostnossl_look_at_encryption():
    r = rules({"type": "hostssl", "method": "scram-sha-256"}, {"type": "hostnossl", "method": "reject"})

    assert r.method_for("d", "u", "1.2.3.4", True) == "scram-sha-256"
    assert r.method_for("d", "u", "1.2.3.4", False) == "reject"


def test_failures_outside_the_window_do_not_add_up():
    brake = LoginThrottle(max_failures=3, window=10, lockout=30)

    spread = [brake.failed("a", t) for t in (0, 6, 12, 18)]   # never three within 10 s
    bunched = [brake.failed("b", t) for t in (0, 1, 2)]

    assert spread == [False] * 4 and not brake.locked("a", 19)
    assert bunched == [False, False, True]
    assert brake.locked("b", 31) and not brake.locked("b", 33)
