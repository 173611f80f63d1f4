"""Which statements carry session state that transaction pooling must replay or pin."""
import pytest

from proxy.effects import Effect, effects_of


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
    "UPDATE t SET a = 1 WHERE b = 2",
    "BEGIN", "SET LOCAL search_path TO x", "SELECT pg_advisory_xact_lock(1)",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "DECLARE c CURSOR FOR SELECT 1",
])
def test_ordinary_statements_have_no_session_effect(sql):
    assert effects_of(sql.encode()) == ()


def test_session_set_is_recorded_with_its_text():
    (e,) = effects_of(b"SET search_path TO a, b")
    assert (e.kind, e.name, e.text) == (Effect.SET, "search_path", "SET search_path TO a, b")


def test_statements_of_a_multi_statement_query_keep_their_index():
    effects = effects_of(b"SELECT 1; SET TimeZone = 'UTC'; RESET datestyle")
    assert [(e.index, e.kind) for e in effects] == [(1, Effect.SET), (2, Effect.RESET)]


@pytest.mark.parametrize("sql,reason", [
    ("LISTEN jobs", "LISTEN"),
    ("SELECT pg_advisory_lock(42)", "session advisory lock"),
    ("CREATE TEMP TABLE scratch (a int)", "temporary table"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD cursor"),
    ("PREPARE q AS SELECT 1", "PREPARE"),
    ("SELECT set_config('search_path', 'x', false)", "set_config()"),
])
def test_state_that_cannot_move_pins_the_client(sql, reason):
    (e,) = effects_of(sql.encode())
    assert (e.kind, e.name) == (Effect.PIN, reason)


def test_discard_all_and_reset_all():
    assert effects_of(b"DISCARD ALL")[0].kind == Effect.DISCARD_ALL
    assert effects_of(b"RESET ALL")[0].kind == Effect.RESET_ALL


def test_unparseable_text_has_no_effect():
    assert effects_of(b"SET search_path TO (((") == ()
