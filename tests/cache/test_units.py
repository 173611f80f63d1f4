"""Pure logic of the cache: statement shapes and syntax facts, Postgres query trees, the RESP parser, the L1,
admission, contexts and keys."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache import NO_KEY, CacheContext, HeuristicAdmission, ResultCache, TemplateStats
from proxy.cache import safety as S
from proxy.cache.context import split_search_path
from proxy.cache.decoding import parse_qualified
from proxy.cache import l1 as l1_module
from proxy.cache.l1 import L1Cache, L1Entry
from proxy.cache.resp import ReplyParser, RespError, encode_command
from tests.cache.conftest import cache_config


# ---------------------------------------------------------------- shapes

def test_texts_differing_only_in_constants_of_one_type_share_a_shape():
    a, _ = S.shape_of("SELECT * FROM t WHERE id = 1 AND name = 'x'")
    b, _ = S.shape_of("SELECT * FROM t WHERE id = 42 AND name = 'yy' -- a comment")
    assert a == b.rstrip()


@pytest.mark.parametrize("one, other", [
    ("SELECT f(1)", "SELECT f('1')"),             # int4 vs unknown-typed string: another overload
    ("SELECT f(1)", "SELECT f(3000000000)"),      # int4 vs int8
    ("SELECT f(1)", "SELECT f(1.5)"),             # int4 vs numeric
])
def test_constants_of_other_types_get_other_shapes(one, other):
    assert S.shape_of(one)[0] != S.shape_of(other)[0]


@pytest.mark.parametrize("sql", ["SELECT * FROM t WHERE ts > 'now'", "SELECT DATE 'today'",
                                 "SELECT * FROM t WHERE d < 'tomorrow'::date", "SELECT 'yesterday 10:00'::timestamp"])
def test_moving_date_inputs_are_spotted(sql):
    assert S.shape_of(sql) == (None, True)


def test_words_containing_now_are_not_moving_inputs():
    assert S.shape_of("SELECT * FROM t WHERE place = 'nowhere'")[1] is False


def test_bound_parameters_spelling_now_are_spotted():
    assert S.params_have_moving_input(b"\x00\x00\x00\x03NOW")
    assert not S.params_have_moving_input(b"\x00\x00\x00\x07nowhere")


# ---------------------------------------------------------------- syntax facts

@pytest.mark.parametrize("sql, reason", [
    ("SELECT * FROM t WHERE id = 1", None),
    ("SELECT now()", S.VOLATILE),
    ("SELECT random()", S.VOLATILE),
    ("SELECT nextval('s')", S.VOLATILE),
    ("SELECT current_user", S.VOLATILE),
    ("SELECT CURRENT_TIMESTAMP", S.VOLATILE),
    ("SELECT * FROM t FOR UPDATE", S.LOCKING),
    ("SELECT * FROM t FOR SHARE SKIP LOCKED", S.LOCKING),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", S.WRITES),
    ("SELECT * FROM t TABLESAMPLE system (10)", S.TABLESAMPLE),
    ("SELECT 1; SELECT 2", S.MULTI_STATEMENT),
    ("INSERT INTO t VALUES (1)", S.NOT_SELECT),
    ("SELECT * INTO t2 FROM t", S.NOT_SELECT),
    ("EXPLAIN SELECT 1", S.NOT_SELECT),
    ("SELEC 1", S.UNPARSEABLE),
])
def test_syntax_refusals(sql, reason):
    assert S.syntax_facts(sql).reason == reason


def test_syntax_facts_find_parameters_by_byte_offset_and_the_statement_span():
    sql = "SELECT 'é', a FROM t WHERE x = $1 AND y = $2;"
    f = S.syntax_facts(sql)
    raw = sql.encode()
    assert sorted(f.params) == [(1, raw.index(b"$1")), (2, raw.index(b"$2"))]
    assert raw[f.stmt_start:f.stmt_end] == raw[:-1]


def test_call_do_execute_and_alter_system_flush_on_sight():
    for sql in ("CALL p()", "DO $$ BEGIN END $$", "EXECUTE s(1)", "ALTER SYSTEM SET timezone = 'UTC'"):
        assert S.flushes_on_sight(S.syntax_facts(sql))
    assert not S.flushes_on_sight(S.syntax_facts("SELECT 1"))


# ---------------------------------------------------------------- Postgres query trees

_TREE = ('({QUERY :commandType 1 :hasForUpdate false :hasModifyingCTE false :rtable ({RANGETBLENTRY :alias <> '
         ':eref {ALIAS :aliasname t :colnames ("id" ":funcid\\ 99")} :rtekind 0 :relid 16384 :relkind r '
         ':tablesample <>} {RANGETBLENTRY :rtekind 1 :subquery <>}) :targetList ({TARGETENTRY :expr {FUNCEXPR '
         ':funcid 1299 :args <>}} {TARGETENTRY :expr {OPEXPR :opno 521 :opfuncid 147 :args ({CONST :consttype 23 '
         ':constvalue 4 [ 3 0 0 0 0 0 0 0 ]})}}) :sortClause ({SORTGROUPCLAUSE :eqop 96 :sortop 97}) :rowMarks <>})')


def test_query_tree_scan_collects_functions_operators_relations_and_types():
    f = S.scan_node_tree(_TREE)
    assert f.reason is None
    assert f.functions == {1299, 147}
    assert f.operators == {521, 96, 97}
    assert f.relations == {16384}
    assert f.types == {23}


@pytest.mark.parametrize("node, reason", [
    ("{SQLVALUEFUNCTION :op 10 :type 19}", S.VOLATILE),
    ("{NEXTVALUEEXPR :seqid 5 :typeId 20}", S.VOLATILE),
])
def test_query_tree_scan_refuses_value_functions(node, reason):
    assert S.scan_node_tree(f"({{QUERY :targetList ({{TARGETENTRY :expr {node}}})}})").reason == reason


def test_query_tree_scan_refuses_row_marks():
    assert S.scan_node_tree("({QUERY :rowMarks ({ROWMARKCLAUSE :rti 1})})").reason == S.LOCKING


# ---------------------------------------------------------------- RESP

def test_resp_parser_reassembles_replies_split_anywhere():
    stream = b"+OK\r\n:42\r\n$5\r\nhel\r\n\r\n$-1\r\n*3\r\n$1\r\na\r\n*1\r\n:7\r\n$0\r\n\r\n-ERR bad\r\n"
    expected = [b"OK", 42, b"hel\r\n", None, [b"a", [7], b""]]
    for cut in range(1, len(stream)):
        p = ReplyParser()
        replies = p.feed(stream[:cut]) + p.feed(stream[cut:])
        assert replies[:5] == expected
        assert isinstance(replies[5], RespError) and str(replies[5]) == "ERR bad"
        assert p.pending_bytes == 0


@given(st.lists(st.binary(max_size=40), max_size=6))
@settings(max_examples=200, deadline=None)
def test_resp_bulk_strings_round_trip_through_the_command_encoding(values):
    # A command is an array of bulk strings: parsing it back as a reply gives the same values.
    assert ReplyParser().feed(encode_command(values)) == [values]


# ---------------------------------------------------------------- L1

def entry(exec_us: float = 100.0, size: int = 1000, tables=("db/public.t",), stats=None) -> L1Entry:
    """An L1 entry whose payload, tag and overhead take `size` bytes."""
    payload = b"x" * (size - len("tag") - l1_module._OVERHEAD)
    return L1Entry("tag", payload, stats, tables, exec_us)


def l1_invariants_hold(l1: L1Cache) -> bool:
    """Bytes are the sum of what is held, the table index names exactly the held entries, and (GDSF) every
    held entry has its item on the heap at or below its priority."""
    held = l1._entries
    index = {(t, k) for t, keys in l1._by_table.items() for k in keys}
    ok = l1.bytes == sum(e.size for e in held.values()) <= l1.max_bytes
    ok = ok and index == {(t, k) for k, e in held.items() for t in e.tables}
    if l1.eviction == "gdsf":
        order = l1._order
        items = {(k, stamp): p for p, stamp, k in order._heap}
        ok = ok and order._held == held
        ok = ok and all(items.get((k, e.stamp), float("inf")) <= e.priority for k, e in held.items())
    return ok


def test_l1_lru_evicts_the_least_recently_hit_beyond_its_byte_budget():
    l1 = L1Cache(max_bytes=3 * 1300, eviction="lru")
    for k in (b"a", b"b", b"c"):
        l1.put(k, entry())
    l1.hit(b"a", l1.get(b"a"))
    l1.put(b"d", entry())
    assert l1.get(b"b") is None and l1.get(b"a") is not None
    assert l1.bytes <= l1.max_bytes and l1.evictions == 1


def test_l1_gdsf_evicts_the_entry_that_saves_least_postgres_time_per_byte():
    l1 = L1Cache(max_bytes=3000)
    l1.put(b"slow", entry(exec_us=140_000, size=1000))
    l1.put(b"fast", entry(exec_us=100, size=1000))
    l1.put(b"big", entry(exec_us=20_000, size=1000))
    l1.hit(b"fast", l1.get(b"fast"))          # hit, and the most recent: LRU would keep it
    l1.put(b"new", entry(exec_us=5_000, size=1000))
    assert l1.get(b"fast") is None
    assert all(l1.get(k) is not None for k in (b"slow", b"big", b"new"))
    assert l1.evictions == 1 and l1_invariants_hold(l1)


def test_l1_gdsf_keeps_the_entry_hit_more_among_equally_valuable_ones():
    l1 = L1Cache(max_bytes=2000)
    l1.put(b"a", entry())
    l1.put(b"b", entry())
    l1.hit(b"a", l1.get(b"a"))
    l1.put(b"c", entry(exec_us=101))
    assert l1.get(b"b") is None and l1.get(b"a") is not None and l1.get(b"c") is not None


def test_l1_gdsf_costs_a_result_read_from_the_shared_tier_at_its_template_mean():
    costly, cheap = TemplateStats("costly"), TemplateStats("cheap")
    costly.executed(90_000)
    cheap.executed(50)
    l1 = L1Cache(max_bytes=2000)
    l1.put(b"costly", entry(exec_us=None, stats=costly))
    l1.put(b"cheap", entry(exec_us=None, stats=cheap))
    l1.put(b"new", entry(exec_us=1_000))
    assert l1.get(b"cheap") is None and l1.get(b"costly") is not None


def test_l1_gdsf_values_a_result_of_a_template_never_executed_here_like_the_entries_stored_lately():
    # another proxy stored it: no execution time is known here, so it is neither kept first nor evicted first
    unknown = TemplateStats("filled elsewhere")
    l1 = L1Cache(max_bytes=1 << 20)
    for j in range(200):
        l1.put(b"%d" % j, entry(exec_us=1000 if j % 2 else 100))
    l1.put(b"elsewhere", entry(exec_us=None, stats=unknown))
    assert 100 / 1000 < l1.get(b"elsewhere").value < 1000 / 1000
    l1 = L1Cache(max_bytes=3000)
    l1.put(b"cheap", entry(exec_us=10))
    l1.put(b"costly", entry(exec_us=90_000))
    l1.put(b"elsewhere", entry(exec_us=None, stats=unknown))
    l1.put(b"new", entry(exec_us=5_000))
    assert l1.get(b"cheap") is None
    assert all(l1.get(k) is not None for k in (b"costly", b"elsewhere", b"new"))


def test_l1_gdsf_turns_away_a_result_worth_less_than_everything_held():
    l1 = L1Cache(max_bytes=2000)
    l1.put(b"a", entry(exec_us=5_000))
    l1.put(b"b", entry(exec_us=5_000))
    l1.put(b"c", entry(exec_us=10))
    assert l1.get(b"c") is None and len(l1) == 2 and l1.bytes == 2000
    assert (l1.evictions, l1.turned_away) == (0, 1)


def test_l1_gdsf_ages_out_a_costly_entry_that_is_not_hit_again():
    l1 = L1Cache(max_bytes=2000)
    l1.put(b"old", entry(exec_us=500))
    for j in range(20):                   # each eviction raises the clock; fresh cheap results outrank it
        l1.put(b"%d" % j, entry(exec_us=100))
    assert l1.get(b"old") is None and l1.clock > 0


def test_l1_drops_entries_by_the_tables_they_read():
    l1 = L1Cache(max_bytes=1 << 20)
    l1.put(b"a", entry(tables=("db/public.t", "db/public.u")))
    l1.put(b"b", entry(tables=("db/public.u",)))
    l1.put(b"c", entry(tables=("db/public.v",)))
    assert l1.drop_tables(["db/public.t"]) == 1
    assert l1.get(b"a") is None and l1.get(b"b") is not None and l1.get(b"c") is not None
    assert l1.bytes == 2000 and l1_invariants_hold(l1)


L1_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 15), st.integers(0, 3000), st.integers(250, 900), st.integers(0, 3)),
    st.tuples(st.just("hit"), st.integers(0, 15)),
    st.tuples(st.just("drop"), st.integers(0, 15)),
    st.tuples(st.just("drop_tables"), st.integers(0, 3)),
    st.tuples(st.just("clear"),)), max_size=300)


@given(L1_OPS, st.sampled_from(["gdsf", "lru"]))
@settings(max_examples=150, deadline=None)
def test_l1_accounting_stays_exact_through_puts_hits_and_drops(ops, eviction):
    l1 = L1Cache(max_bytes=3000, eviction=eviction)
    for op in ops:
        if op[0] == "put":
            _, k, exec_us, size, t = op
            l1.put(b"%d" % k, entry(exec_us, size, (f"db/public.t{t}", f"db/public.t{(t + 1) % 4}")))
        elif op[0] == "hit":
            e = l1.get(b"%d" % op[1])
            if e is not None:
                l1.hit(b"%d" % op[1], e)
        elif op[0] == "drop":
            l1.drop(b"%d" % op[1])
        elif op[0] == "drop_tables":
            gone = [k for k, e in l1._entries.items() if f"db/public.t{op[1]}" in e.tables]
            assert l1.drop_tables([f"db/public.t{op[1]}"]) == len(gone)
            assert all(l1.get(k) is None for k in gone)
        else:
            l1.clear()
            assert (len(l1), l1.bytes) == (0, 0)
        assert l1_invariants_hold(l1)


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 5000), st.integers(250, 900), st.booleans()),
                max_size=200))
@settings(max_examples=100, deadline=None)
def test_l1_gdsf_holds_what_a_scan_for_the_least_priority_would_hold(ops):
    """The lazily invalidated heap evicts as a scan of every entry for the least (priority, age) would."""
    l1 = L1Cache(max_bytes=3000)
    ref, clock, age = {}, 0.0, 0      # key -> [priority, age, freq, value, size]
    for k, exec_us, size, hit in ops:
        key = b"%d" % k
        if hit and key in ref:
            l1.hit(key, l1.get(key))
            r = ref[key]
            r[2] += 1
            r[0] = clock + r[2] * r[3]
            continue
        l1.put(key, entry(exec_us, size))
        ref.pop(key, None)
        value = exec_us / size
        priority = clock + value
        while sum(r[4] for r in ref.values()) + size > 3000 and ref:
            victim = min(ref, key=lambda x: (ref[x][0], ref[x][1]))
            if ref[victim][0] >= priority:
                clock, priority = priority, None
                break
            clock = ref.pop(victim)[0]
        if priority is not None:
            age += 1
            ref[key] = [priority, age, 1, value, size]
        assert set(l1._entries) == set(ref)
        assert l1_invariants_hold(l1)


def test_l1_refuses_an_unknown_eviction():
    with pytest.raises(ValueError):
        L1Cache(1000, eviction="fifo")


# ---------------------------------------------------------------- admission

def _stats(offered, admitted, hits, exec_us, nbytes=100):
    s = TemplateStats("t")
    s.offered, s.admitted, s.hits = offered, admitted, hits
    s.exec_us_sum, s.bytes_sum = exec_us * offered, nbytes * offered
    return s


def test_admission_admits_new_templates():
    assert HeuristicAdmission(warmup=8).admit(_stats(3, 3, 0, 10))


def test_admission_admits_templates_whose_entries_save_time():
    assert HeuristicAdmission(warmup=8, min_saved_us=200).admit(_stats(100, 20, 60, 500))


def test_admission_declines_entries_never_reused_except_to_explore():
    policy = HeuristicAdmission(warmup=8, min_saved_us=200, explore_every=16)
    decisions = [policy.admit(_stats(n, 20, 0, 5000)) for n in range(100, 132)]
    assert decisions.count(True) == 2


def _looked_up(stats, lookups, hits, floor_us):
    for i in range(lookups):
        stats.looked_up(i < hits)
    stats.exec_us_floor = floor_us
    return stats


def test_admission_declines_templates_whose_lookups_rarely_hit():
    policy = HeuristicAdmission(warmup=8, min_saved_us=0, explore_every=1000, lookup_us=100)
    # a cheap query whose lookups mostly miss: 0.15 x 300 us saved < 0.85 x 100 us spent
    assert not policy.admit(_looked_up(_stats(99, 20, 15, 300), 100, 15, 300))
    # the same hit ratio on a query that costs 50 ms: worth it
    assert policy.admit(_looked_up(_stats(99, 20, 15, 50_000), 100, 15, 50_000))
    # a cheap query that mostly hits
    assert policy.admit(_looked_up(_stats(99, 20, 90, 300), 100, 90, 300))
    # too few lookups to judge yet, or the rule turned off
    assert policy.admit(_looked_up(_stats(99, 20, 15, 300), 20, 3, 300))
    assert HeuristicAdmission(warmup=8, min_saved_us=0, lookup_us=0).admit(
        _looked_up(_stats(99, 20, 15, 300), 100, 15, 300))


def test_the_service_time_follows_the_fastest_executions():
    s = TemplateStats("t")
    for us in (900, 300, 5000, 5000, 5000):
        s.executed(us)
    assert 300 < s.exec_us_floor < 1000
    s.executed(120)
    assert s.exec_us_floor == 120 and s.offered == 6


def test_admission_asks_large_results_to_save_more():
    policy = HeuristicAdmission(warmup=0, min_saved_us=200, explore_every=1000, size_scale=65536)
    assert policy.admit(_stats(10, 10, 10, 300, nbytes=1000))
    assert not policy.admit(_stats(11, 10, 10, 300, nbytes=1 << 20))


# ---------------------------------------------------------------- contexts and keys

def test_search_path_is_split_like_postgres_does():
    assert split_search_path('"$user", public') == ["$user", "public"]
    assert split_search_path('App, "My ""Schema""" ,x') == ["app", 'My "Schema"', "x"]
    assert CacheContext("d", "alice", {"search_path": '"$user", public'}).schemas == ("alice", "public")


def test_context_settings_are_case_insensitive():
    a = CacheContext("d", "r", {"TimeZone": "UTC"})
    b = CacheContext("d", "r", {"timezone": "UTC"})
    assert a.digest == b.digest


@pytest.fixture
def keyer():
    return ResultCache(cache_config(None), {})


@pytest.mark.parametrize("change", [
    {"database": "other"}, {"role": "bob"}, {"search_path": "app, public"}, {"TimeZone": "Europe/Paris"},
    {"DateStyle": "SQL, DMY"}, {"IntervalStyle": "iso_8601"}, {"extra_float_digits": "0"},
    {"bytea_output": "escape"}, {"client_encoding": "LATIN1"},
])
def test_keys_differ_for_anything_that_changes_result_bytes(keyer, change):
    base = {"database": "app", "role": "alice", "search_path": "public", "TimeZone": "UTC"}
    other = {**base, **change}
    ctx = lambda d: CacheContext(d["database"], d["role"], {k: v for k, v in d.items()   # noqa: E731
                                                           if k not in ("database", "role")})
    assert keyer.key(ctx(base), b"SELECT 1") != keyer.key(ctx(other), b"SELECT 1")


def test_keys_differ_for_parameters_and_formats(keyer):
    ctx = CacheContext("app", "alice", {})
    sql = b"SELECT * FROM t WHERE id = $1"
    assert keyer.key(ctx, sql, b"\x00\x01\x00\x00\x00\x011") != keyer.key(ctx, sql, b"\x00\x01\x00\x00\x00\x012")
    assert keyer.key(ctx, sql, b"p", b"\x00\x00") != keyer.key(ctx, sql, b"p", b"\x00\x01\x00\x01")
    # Boundaries are part of the key: moving bytes from the text to the parameters changes it.
    assert keyer.key(ctx, b"ab", b"c") != keyer.key(ctx, b"a", b"bc")


def test_a_parameter_spelling_now_gets_no_key(keyer):
    assert keyer.key(CacheContext("app", "alice", {}), b"SELECT $1::timestamptz", b"\x00\x03now") == NO_KEY


def test_decoded_table_names_are_unquoted():
    assert parse_qualified("public.t") == ("public", "t")
    assert parse_qualified('"We ird"."Ta: INSERT:b"') == ("We ird", "Ta: INSERT:b")
    assert parse_qualified('public."a""b"') == ("public", 'a"b')
    assert parse_qualified("garbage") is None


@pytest.mark.parametrize("settings, refusal", [
    ({}, None), ({"client_encoding": "UTF8"}, None), ({"standard_conforming_strings": "on"}, None),
    ({"standard_conforming_strings": "off"}, "nonstandard_strings"),   # backslashes would lex otherwise
    ({"client_encoding": "SJIS"}, "client_encoding"),
])
def test_sessions_lexing_texts_unlike_the_analysis_are_refused(settings, refusal):
    assert CacheContext("d", "r", settings).refusal == refusal
