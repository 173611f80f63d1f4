"""Statement analysis: kinds, tables, normalization, multi-statement texts, and the literal-stripping cache."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.analysis import Analyzer, analyze_uncached, extract_literals, literal_key


@pytest.mark.parametrize("sql, kind", [
    ("SELECT 1", "select"),
    ("VALUES (1), (2)", "select"),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "select"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("UPDATE t SET a = 1", "update"),
    ("DELETE FROM t WHERE a = 1", "delete"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "merge"),
    ("CREATE TABLE t (a int)", "ddl"),
    ("ALTER TABLE t ADD COLUMN b int", "ddl"),
    ("DROP TABLE t", "ddl"),
    ("CREATE INDEX ON t (a)", "ddl"),
    ("TRUNCATE t", "ddl"),
    ("SELECT * INTO t2 FROM t", "ddl"),
    ("COPY t FROM STDIN", "copy"),
    ("COPY (SELECT 1) TO STDOUT", "copy"),
    ("BEGIN", "transaction"),
    ("COMMIT", "transaction"),
    ("SAVEPOINT s", "transaction"),
    ("SET search_path = app, public", "set"),
    ("RESET ALL", "set"),
    ("SHOW work_mem", "utility"),
    ("VACUUM t", "utility"),
    ("EXPLAIN SELECT 1", "utility"),
    ("LISTEN ch", "utility"),
    ("ALTER SYSTEM SET work_mem = '8MB'", "utility"),
    ("selec 1", "other"),
    ("", "other"),
])
def test_statement_kind(sql, kind):
    assert analyze_uncached(sql).kind == kind


@pytest.mark.parametrize("sql, read, written", [
    ("SELECT * FROM a JOIN s.b ON a.id = b.id", ["a", "s.b"], []),
    ("SELECT * FROM a WHERE x IN (SELECT y FROM b)", ["a", "b"], []),
    ("WITH c AS (SELECT * FROM a) SELECT * FROM c JOIN b ON true", ["a", "b"], []),
    ("INSERT INTO s.t SELECT * FROM u", ["u"], ["s.t"]),
    ("UPDATE t SET v = u.v FROM u WHERE t.id = u.id", ["u"], ["t"]),
    ("DELETE FROM t USING u WHERE t.id = u.id", ["u"], ["t"]),
    ("WITH gone AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM gone", [], ["a", "b"]),
    ('UPDATE "App"."Users" SET n = 1', [], ["App.Users"]),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v", ["s"], ["t"]),
    ("COPY t FROM STDIN", [], ["t"]),
    ("COPY t TO STDOUT", ["t"], []),
    ("CREATE TABLE t2 AS SELECT * FROM t1", ["t1"], ["t2"]),
    ("DROP TABLE a, s.b", [], ["a", "s.b"]),
    ("TRUNCATE a, b", [], ["a", "b"]),
    ("EXPLAIN UPDATE t SET v = 1", ["t"], []),
    ("EXPLAIN ANALYZE UPDATE t SET v = 1", [], ["t"]),
    ("ALTER TABLE t ADD COLUMN c int REFERENCES u (id)", ["u"], ["t"]),
])
def test_tables_read_and_written(sql, read, written):
    info = analyze_uncached(sql)
    assert list(info.tables_read) == read
    assert list(info.tables_written) == written


def test_normalization_replaces_constants_with_numbered_parameters():
    info = analyze_uncached("SELECT a FROM t WHERE b = 'x''y' AND c > 4.5e3 AND d = -7 LIMIT 10")
    assert info.normalized == "SELECT a FROM t WHERE b = $1 AND c > $2 AND d = $3 LIMIT $4"


def test_normalization_numbers_after_existing_parameters():
    info = analyze_uncached("SELECT a FROM t WHERE b = $1 AND c = 5")
    assert info.normalized == "SELECT a FROM t WHERE b = $1 AND c = $2"


def test_normalization_keeps_type_modifiers_and_drops_comments():
    info = analyze_uncached("/* app: checkout */ SELECT a::varchar(10) FROM t WHERE b = 'é' -- trailing\n AND c = 2")
    assert info.normalized.startswith("SELECT a::varchar(10) FROM t WHERE b = $1")
    assert info.normalized.endswith("AND c = $2")
    assert "checkout" not in info.normalized and "trailing" not in info.normalized


def test_normalization_handles_every_literal_form():
    sql = "SELECT E'a\\'b', B'0101', X'ff', U&'d\\0061t', $$dollar$$, $q$tagged$q$, 0x1F, 1_000, .5 FROM t"
    info = analyze_uncached(sql)
    assert info.normalized == "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM t"


def test_multi_statement_text_lists_each_statement():
    info = analyze_uncached("BEGIN; UPDATE acc SET bal = bal - 5 WHERE id = 3; SELECT bal FROM acc WHERE id = 3; COMMIT")
    assert [s.kind for s in info.statements] == ["transaction", "update", "select", "transaction"]
    assert info.statements[1].normalized == "UPDATE acc SET bal = bal - $1 WHERE id = $2"
    assert info.statements[2].tables_read == ("acc",)
    assert info.statements[1].fingerprint == analyze_uncached("UPDATE acc SET bal = bal - 1 WHERE id = 9").fingerprint
    assert info.kind == "update"           # the text as a whole: its first non-transaction statement
    assert info.tables_written == ("acc",)


def test_multi_statement_offsets_survive_non_ascii_text():
    info = analyze_uncached("SELECT 'héllo'; SELECT 'wörld', 2 FROM t")
    assert [s.normalized for s in info.statements] == ["SELECT $1", "SELECT $1, $2 FROM t"]


def test_single_statement_text_is_its_own_only_statement():
    info = analyze_uncached("SELECT 1")
    assert info.statements == (info,)


def test_unparseable_sql_gets_kind_other_and_a_fingerprint_without_literals():
    info = analyze_uncached("SELEC name FROM users WHERE password = 'hunter2'")
    assert info.kind == "other" and not info.parsed
    assert re.fullmatch(r"[0-9a-f]{16}", info.fingerprint)
    assert "hunter2" not in info.normalized


def test_unterminated_quote_is_redacted():
    info = analyze_uncached("SELECT * FROM t WHERE secret = 'hunter2")
    assert info.kind == "other"
    assert "hunter2" not in info.normalized


def test_unparseable_texts_differing_in_constants_share_a_fingerprint():
    assert analyze_uncached("SELEC 1").fingerprint == analyze_uncached("SELEC 2").fingerprint
    assert analyze_uncached("SELEC 1").fingerprint != analyze_uncached("SELEC x").fingerprint


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_analysis_never_raises(text):
    text = text.replace("\0", "")
    info = Analyzer(max_entries=10).analyze(text)
    assert info.kind in ("select", "insert", "update", "delete", "merge", "ddl", "utility", "copy",
                         "transaction", "set", "other")


def test_texts_differing_only_in_constants_share_one_cache_entry():
    analyzer = Analyzer()
    first = analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 123;")
    second = analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 456;")
    assert second is first
    assert (analyzer.misses, analyzer.hits, len(analyzer)) == (1, 1, 1)


@pytest.mark.parametrize("a, b", [
    ("SELECT * FROM t1 WHERE a = 1", "SELECT * FROM t2 WHERE a = 1"),
    ("SELECT c1 FROM t WHERE a = 1", "SELECT c2 FROM t WHERE a = 1"),
    ('SELECT * FROM "t 1" WHERE a = 1', 'SELECT * FROM "t 2" WHERE a = 1'),
    ("SELECT * FROM t WHERE a = 1", "SELECT * FROM t WHERE a > 1"),
    ("SELECT * FROM t WHERE a = $1", "SELECT * FROM t WHERE a = $2 AND b = 1"),
    ("SELECT * FROM t WHERE a = 'x'", "SELECT * FROM t WHERE a = x"),
])
def test_texts_differing_in_structure_do_not_share_a_cache_entry(a, b):
    analyzer = Analyzer()
    analyzer.analyze(a)
    analyzer.analyze(b)
    assert analyzer.misses == 2


def test_statements_whose_constants_matter_are_cached_by_exact_text():
    analyzer = Analyzer()
    one = analyzer.analyze("COMMENT ON TABLE t IS 'one'")
    two = analyzer.analyze("COMMENT ON TABLE t IS 'two'")
    assert analyzer.misses == 2
    assert one.fingerprint == analyze_uncached("COMMENT ON TABLE t IS 'one'").fingerprint
    assert two.fingerprint == analyze_uncached("COMMENT ON TABLE t IS 'two'").fingerprint


def test_literal_key_ignores_comments_and_keeps_identifiers():
    key, clean = literal_key("SELECT x1 FROM t2 WHERE a = 5 /* request 17 */")
    assert clean and key == literal_key("SELECT x1 FROM t2 WHERE a = 7 /* request 18 */")[0]
    assert "x1" in key and "t2" in key and "17" not in key


def test_literal_key_of_an_unterminated_quote_is_the_text_itself():
    assert literal_key("SELECT 'abc") == ("SELECT 'abc", False)


def test_extract_literals_in_text_order():
    assert extract_literals("SELECT * FROM t WHERE a = 'it''s' AND b IN (1, 2.5) AND c = x'ff'") == \
        ["it's", "1", "2.5", "x'ff'"]


# --- the cache key never merges texts whose analyses differ ---

_IDENTS = ["t", "t1", "t2", "a", "a1", "b_2", '"T 1"', '"T 2"', '"x\'y"', "s.t1", "s2.t"]
_PLAIN_LITERALS = st.one_of(
    st.integers(0, 10**12).map(str),  # a minus sign is an operator, part of the key
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: repr(abs(f))),
    st.text(alphabet="ab'\" 1-/*$\\é", max_size=6).map(lambda s: "'" + s.replace("'", "''") + "'"),
    st.just("$$x$$"),
)
# Prefixed strings keep their prefix letter in the key: another form, another entry.
_LITERALS = st.one_of(_PLAIN_LITERALS, st.integers(-10**6, -1).map(str), st.just("E'\\''"), st.just("B'01'"))
_NOT_LITERALS = st.sampled_from(["$1", "NULL", "a1", "t.a"])
_OPS = ["=", "<", ">=", "<>", "-"]


@st.composite
def _template(draw):
    """A statement with {0}, {1}, ... where constants go."""
    table = draw(st.sampled_from(_IDENTS))
    col = draw(st.sampled_from(_IDENTS[:6]))
    conds = draw(st.lists(st.tuples(st.sampled_from(_IDENTS[:6]), st.sampled_from(_OPS)), min_size=1, max_size=3))
    shape = draw(st.sampled_from(["select", "update", "delete", "insert", "clock"]))
    where = " AND ".join(f"{c} {op} {{{i + 1}}}" for i, (c, op) in enumerate(conds))
    comment = draw(st.sampled_from(["", " -- note 1", " /* 2 */"]))
    sql = {
        "select": f"SELECT {col} FROM {table} WHERE {where} LIMIT {{0}}",
        "update": f"UPDATE {table} SET {col} = {{0}} WHERE {where}",
        "delete": f"DELETE FROM {table} WHERE {where} AND {col} = {{0}}",
        "clock": f"SELECT current_timestamp({{0}}) FROM {table} WHERE {where}",
        "insert": f"INSERT INTO {table} ({col}) VALUES " + ", ".join(f"({{{i}}})" for i in range(len(conds) + 1)),
    }[shape]
    return sql + comment, len(conds) + 1


@st.composite
def _filled_twice(draw, values):
    template, slots = draw(_template())
    return (template.format(*draw(st.lists(values, min_size=slots, max_size=slots))),
            template.format(*draw(st.lists(values, min_size=slots, max_size=slots))))


def _facts(info):
    return info.fingerprint, info.kind, info.tables_read, info.tables_written, info.normalized


def _cached_after(first, then):
    analyzer = Analyzer()
    analyzer.analyze(first)
    return analyzer.analyze(then)


@given(_filled_twice(st.one_of(_LITERALS, _NOT_LITERALS)))
@settings(max_examples=400, deadline=None)
def test_a_cache_primed_with_a_sibling_text_answers_like_a_fresh_analysis(pair):
    a, b = pair
    assert _facts(_cached_after(a, b)) == _facts(analyze_uncached(b))


@given(_template(), _template(), st.lists(_LITERALS, min_size=4, max_size=4))
@settings(max_examples=300, deadline=None)
def test_a_cache_primed_with_another_statement_answers_like_a_fresh_analysis(t1, t2, values):
    a, b = t1[0].format(*values), t2[0].format(*values)
    assert _facts(_cached_after(a, b)) == _facts(analyze_uncached(b))


@given(_filled_twice(_PLAIN_LITERALS))
@settings(max_examples=300, deadline=None)
def test_changing_only_constants_keeps_the_cache_key(pair):
    a, b = pair
    key_a, clean = literal_key(a)
    assert clean and key_a == literal_key(b)[0]


def test_the_cache_stays_within_its_character_budget():
    analyzer = Analyzer(max_chars=64 * 1024)
    for i in range(200):
        analyzer.analyze(f"SELECT col_{i} FROM t WHERE x IN ({', '.join(['1'] * 50)})")
    analyzer.analyze("INSERT INTO t VALUES " + ", ".join(["(1, 'x')"] * 5000))   # too big to keep
    assert 0 < analyzer.cached_chars <= 64 * 1024
    assert len(analyzer) < 200


@pytest.mark.parametrize("a, b", [
    ("SELECT current_timestamp(3)", "SELECT current_timestamp(4)"),
    ("COPY t FROM '/tmp/a.csv'", "COPY t FROM '/tmp/b.csv'"),
])
def test_literals_the_fingerprint_sees_keep_texts_apart(a, b):
    analyzer = Analyzer()
    assert analyzer.analyze(a).fingerprint == analyze_uncached(a).fingerprint
    assert analyzer.analyze(b).fingerprint == analyze_uncached(b).fingerprint
    assert analyzer.misses == 2


@given(_template(), st.lists(_LITERALS, min_size=4, max_size=4),
       st.sampled_from([" /* controller='users',action='show' */", "/* a */ ", " /* x /* y */", "/*/", " /**/",
                        " /* it's */ -- more", " /* $$ */"]))
@settings(max_examples=300, deadline=None)
def test_the_trailing_comment_shortcut_gives_the_full_lexers_key(template, values, comment):
    from proxy.analysis import _KEY_LEXER, _key_repl, _Unsafe
    sql = template[0].format(*values) + comment
    try:
        expected = (_KEY_LEXER.sub(_key_repl, sql), True)
    except _Unsafe:
        expected = (sql, False)
    assert literal_key(sql) == expected


FEED_TEXTS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345", "SELECT abalance FROM pgbench_accounts WHERE aid = 98765",
    "SELECT * FROM t1 WHERE a = 5", "SELECT * FROM t2 WHERE a = 5", "SELECT * FROM t WHERE a1 = 5",
    "SELECT * FROM t WHERE a2 = 5", "SELECT x FROM t WHERE y = $1", "SELECT x FROM t WHERE y = $2",
    "SELECT 'a1' FROM t", "SELECT 'a2' FROM t", "SELECT 1.5, .5, 1e3 FROM t", "SELECT 2.5, .7, 9e3 FROM t",
    "SELECT 0x1F FROM t", "SELECT 0x2F FROM t", "CREATE TABLE v1 (x varchar(10))", "CREATE TABLE v1 (x varchar(20))",
    "SELECT 1; SELECT 2", "SELECT 3; SELECT 4", "SELECT * FROM t WHERE a = 5 -- note 1", "SELECT col1 FROM t",
    "SELECT col2 FROM t", "SELECT 1 FROM t LIMIT 10", "SELECT 2 FROM t LIMIT 20",
]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_the_statement_feed_finds_each_text_its_own_analysis(as_bytes):
    from proxy.querylog import StatementFeed
    feed = StatementFeed(Analyzer(), 0.02)
    texts = [t.encode() if as_bytes else t for t in FEED_TEXTS]
    for _ in range(2):   # the second time from its caches
        infos = feed.analyse([(0.0, 0, 0, t) for t in texts])
        for text, info in zip(FEED_TEXTS, infos):
            want = analyze_uncached(text)
            assert (info.fingerprint, info.normalized, info.tables_read) == (
                want.fingerprint, want.normalized, want.tables_read), text
