"""The inline guard's verdicts on Query and Parse messages (pure logic; the proxy-level behaviour is in test_enforce)."""
from __future__ import annotations

import struct

import pytest

from proxy.analysis import analyze
from proxy.config import Config, ConfigError, load_config
from proxy.features import ServingContext, TemplateStats
from proxy.guard import StatementGuard


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def parse(sql: str, name: bytes = b"s1") -> bytes:
    body = name + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0)
    return b"P" + struct.pack("!I", len(body) + 4) + body


@pytest.mark.parametrize("sql", [
    "SELECT name FROM users WHERE email = '' OR 'a'='a'",
    "SELECT name FROM users WHERE id = 1 OR 1=1",
    "SELECT name FROM users WHERE id = 1; DROP TABLE users",
    "SELECT name FROM users WHERE id = -1 UNION SELECT NULL",
    "SELECT name FROM users WHERE id = 1/**/OR/**/1=1",
    "SELECT name FROM users WHERE id = 1 UNION SELECT version()",
])
def test_injection_shapes_are_refused(sql):
    guard = StatementGuard(["injection"])
    assert guard.check(query(sql)).startswith("injection: ")
    assert guard.check(parse(sql)).startswith("injection: ")


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12;",
    "SELECT * FROM t WHERE a = $1 OR b = $2",
    "/* app=web,route=/users */ SELECT id FROM users WHERE id = 5",
    "UPDATE users SET name = 'it''s' WHERE id = 3",
    "SELECT count(*) FROM information_schema.tables",
    "CREATE INDEX ON users (email)",
    "SELECT name FROM users WHERE name = 'x OR 1=1'",
])
def test_ordinary_statements_pass(sql):
    guard = StatementGuard(["injection"])
    assert guard.check(query(sql)) is None
    assert guard.check(parse(sql)) is None


def test_a_verdict_is_taken_once_per_shape_of_a_text():
    decided = []

    class Counting(StatementGuard):
        def decide(self, sql):
            decided.append(sql)
            return super().decide(sql)

    guard = Counting(["injection"])
    for i in range(50):
        assert guard.check(query(f"SELECT name FROM users WHERE id = {i}")) is None
        assert guard.check(query(f"SELECT name FROM users WHERE id = {i} OR {i}={i}")) is not None
    assert len(decided) == 2


def test_new_templates_are_refused_only_once_a_context_lists_the_established_ones():
    known = "SELECT name FROM users WHERE id = 1"
    guard = StatementGuard(["new_template"])
    assert guard.check(query("SELECT secret FROM vault")) is None        # no model: no allowlist yet

    class Model:
        context = ServingContext({analyze(known).fingerprint: TemplateStats(calls=100, app_share={"web": 1.0})},
                                 apps={"web"})
    guard.use_model(Model())
    assert guard.check(query("SELECT name FROM users WHERE id = 99")) is None
    assert guard.check(query("SELECT secret FROM vault")).startswith("new_template: ")


def test_only_classes_known_before_a_statement_runs_can_be_enforced(tmp_path):
    assert Config.model_validate({"anomaly": {"enforce": ["injection", "new_template"]}}).anomaly.enforce
    path = tmp_path / "c.yaml"
    path.write_text("anomaly:\n  enforce: [slow_outlier]\n")
    with pytest.raises(ConfigError, match="anomaly.enforce.*after a statement ran"):
        load_config(path)


def test_a_malformed_parse_is_left_to_the_session():
    guard = StatementGuard(["injection"])
    assert guard.check(b"P\x00\x00\x00\x08s1") is None
    assert guard.check(b"P\x00\x00\x00\x0bs1\x00SEL") is None
