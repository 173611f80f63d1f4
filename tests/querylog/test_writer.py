"""The query log writer against a real log store: every event lands once, templates, literals, partitions."""
from __future__ import annotations

import asyncio
import datetime as dt
import time

import psycopg

from proxy.analysis import analyze_uncached
from proxy.logstore import PARTITIONED, ensure_schema_sync, partition_name
from proxy.querylog import QueryLog
from tests.querylog.conftest import fetch, make_config, make_event


async def _log_all(cfg, dsn, events, proxy_id="p1") -> QueryLog:
    log = QueryLog(cfg, dsn, proxy_id)
    await log.start()
    for ev in events:
        log.submit(ev)
    assert await log.flush(timeout=30)
    await log.stop()
    return log


def _mixed_events(n):
    events = []
    for i in range(n):
        if i % 3 == 0:
            events.append(make_event(f"SELECT abalance FROM pgbench_accounts WHERE aid = {i}", i, rows=1))
        elif i % 3 == 1:
            events.append(make_event(f"UPDATE pgbench_accounts SET abalance = abalance + {i} WHERE aid = {i}", i,
                                     rows=i % 2))
        else:
            events.append(make_event("INSERT INTO pgbench_history (aid) VALUES ($1)", i, rows=None,
                                     sqlstate="23505", protocol="extended", parameters=[str(i)]))
    return events


def test_every_event_lands_exactly_once_with_its_facts(tmp_path, store_dsn):
    events = _mixed_events(600)
    log = asyncio.run(_log_all(make_config(tmp_path, batch_size=100), store_dsn, events))

    got = fetch(store_dsn, "SELECT xact_id, fingerprint, kind, rows, sqlstate, tables_read, tables_written, "
                           "protocol, proxy_id FROM pgpilot.query_events ORDER BY xact_id")
    expected = []
    for ev in events:
        info = analyze_uncached(ev.sql)
        expected.append((ev.xact_id, info.fingerprint, info.kind, ev.rows, ev.sqlstate, list(info.tables_read),
                         list(info.tables_written), ev.protocol, "p1"))
    assert got == expected
    assert (log.submitted, log.written, log.spooled, log.dropped) == (600, 600, 0, 0)


def test_templates_hold_one_row_per_fingerprint_across_writers(tmp_path, store_dsn):
    events = _mixed_events(30)
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, events[:15], proxy_id="p1"))
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, events[15:], proxy_id="p2"))

    rows = fetch(store_dsn, "SELECT fingerprint, normalized_sql, kind, tables_read, tables_written, "
                            "first_seen <= last_seen FROM pgpilot.templates ORDER BY kind")
    assert rows == [
        (analyze_uncached(events[2].sql).fingerprint, "INSERT INTO pgbench_history (aid) VALUES ($1)", "insert",
         [], ["pgbench_history"], True),
        (analyze_uncached(events[0].sql).fingerprint, "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
         "select", ["pgbench_accounts"], [], True),
        (analyze_uncached(events[1].sql).fingerprint,
         "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", "update", [],
         ["pgbench_accounts"], True),
    ]


def test_templates_last_seen_follows_the_latest_event(tmp_path, store_dsn):
    sql = "SELECT 1 FROM pgbench_branches WHERE bid = 1"
    early, late = time.time() - 3600, time.time()

    async def scenario():
        log = QueryLog(make_config(tmp_path, templates_refresh_interval=0.05), store_dsn, "p1")
        await log.start()
        log.submit(make_event(sql, 1, ts=early))
        await log.flush()
        log.submit(make_event(sql, 2, ts=late))   # a known template now: only the periodic refresh moves it
        await log.flush()
        await log.stop()
    asyncio.run(scenario())

    first_seen, last_seen = fetch(store_dsn, "SELECT extract(epoch FROM first_seen), extract(epoch FROM last_seen) "
                                             "FROM pgpilot.templates")[0]
    assert abs(float(first_seen) - early) < 0.01 and abs(float(last_seen) - late) < 0.01


SECRET = "hunter2-secret"


def _secret_events():
    return [
        make_event(f"SELECT id FROM users WHERE password = '{SECRET}'", 1),
        make_event("SELECT id FROM users WHERE password = $1", 2, protocol="extended", parameters=[SECRET]),
        make_event(f"UPDATE users SET password = '{SECRET}' WHERE id = 7; SELECT 1", 3, stmt_index=0),
        make_event(f"SELEC broken '{SECRET}'", 4),
    ]


def test_no_literal_is_stored_with_parameters_off(tmp_path, store_dsn):
    asyncio.run(_log_all(make_config(tmp_path, parameters=False), store_dsn, _secret_events()))

    leaks = fetch(store_dsn, "SELECT (SELECT count(*) FROM pgpilot.query_events e WHERE e::text LIKE %s) + "
                             "(SELECT count(*) FROM pgpilot.templates t WHERE t::text LIKE %s)",
                  f"%{SECRET}%", f"%{SECRET}%")
    assert leaks == [(0,)]
    assert fetch(store_dsn, "SELECT count(*) FROM pgpilot.query_events WHERE parameters IS NULL") == [(4,)]
    assert fetch(store_dsn, "SELECT count(*), count(sample_sql) FROM pgpilot.templates") == [(3, 0)]


def test_literals_are_stored_with_parameters_on(tmp_path, store_dsn):
    asyncio.run(_log_all(make_config(tmp_path, parameters=True), store_dsn, _secret_events()))

    params = fetch(store_dsn, "SELECT xact_id, parameters FROM pgpilot.query_events ORDER BY xact_id")
    assert params[:3] == [(1, [SECRET]), (2, [SECRET]), (3, [SECRET, "7"])]
    samples = fetch(store_dsn, "SELECT sample_sql FROM pgpilot.templates WHERE kind = 'update'")
    assert samples == [(f"UPDATE users SET password = '{SECRET}' WHERE id = 7",)]


def test_an_event_with_stmt_index_logs_that_statement_of_the_text(tmp_path, store_dsn):
    text = "BEGIN; UPDATE acc SET bal = bal - 5 WHERE id = 3; COMMIT"
    events = [make_event(text, 10 + i, stmt_index=i, duration_us=100 * (i + 1), rows=None if i != 1 else 1)
              for i in range(3)]
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, events))

    rows = fetch(store_dsn, "SELECT e.kind, e.duration_us, e.rows, t.normalized_sql FROM pgpilot.query_events e "
                            "JOIN pgpilot.templates t USING (fingerprint) ORDER BY xact_id")
    assert rows == [("transaction", 100, None, "BEGIN"),
                    ("update", 200, 1, "UPDATE acc SET bal = bal - $1 WHERE id = $2"),
                    ("transaction", 300, None, "COMMIT")]


def test_a_multi_statement_event_without_index_is_split_keeping_its_totals(tmp_path, store_dsn):
    text = "SELECT 1; SELECT a FROM t1; DELETE FROM t2 WHERE id = 4"
    event = make_event(text, 1, duration_us=1001, bytes_out=300, wait_us=50, rows=2, sqlstate="42P01")
    log = asyncio.run(_log_all(make_config(tmp_path), store_dsn, [event]))

    rows = fetch(store_dsn, "SELECT kind, duration_us, bytes_out, wait_us, rows, sqlstate "
                            "FROM pgpilot.query_events ORDER BY duration_us, kind DESC")
    assert rows == [("select", 333, 100, 50, None, None), ("select", 333, 100, 0, None, None),
                    ("delete", 335, 100, 0, 2, "42P01")]
    assert (log.submitted, log.written) == (1, 3)


def test_retention_drops_partitions_older_than_retention_days(tmp_path, store_dsn):
    today = dt.datetime.now(dt.timezone.utc).date()
    old, recent = today - dt.timedelta(days=30), today - dt.timedelta(days=3)

    async def maintain():
        log = QueryLog(make_config(tmp_path, retention_days=14), store_dsn, "p1")
        await log.start()
        assert await log.wait_ready()
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            ensure_schema_sync(conn, extra_days=[old, recent])
        dropped = await log.run_maintenance()
        await log.stop()
        return dropped
    dropped = asyncio.run(maintain())

    partitions = {name for (name,) in fetch(store_dsn, "SELECT c.relname FROM pg_inherits i JOIN pg_class c "
                                                        "ON c.oid = i.inhrelid WHERE i.inhparent IN "
                                                        "('pgpilot.query_event_groups'::regclass, "
                                                        "'pgpilot.query_event_rows'::regclass)")}
    expired = sorted(partition_name(old, table) for table in PARTITIONED)
    assert dropped == expired
    assert not set(expired) & partitions
    assert {partition_name(day, table) for day in (recent, today, today + dt.timedelta(days=1))
            for table in PARTITIONED} <= partitions


def test_events_of_a_day_without_partition_get_one(tmp_path, store_dsn):
    five_days_ago = time.time() - 5 * 86400
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, [make_event("SELECT 1", 1, ts=five_days_ago)]))

    day = dt.datetime.fromtimestamp(five_days_ago, dt.timezone.utc).date()
    assert fetch(store_dsn, f"SELECT count(*) FROM pgpilot.{partition_name(day)}, unnest(offsets_us)") == [(1,)]


def test_events_older_than_retention_are_dropped_and_counted(tmp_path, store_dsn):
    events = [make_event("SELECT 1", 1, ts=time.time() - 40 * 86400), make_event("SELECT 1", 2)]
    log = asyncio.run(_log_all(make_config(tmp_path, retention_days=14), store_dsn, events))

    assert fetch(store_dsn, "SELECT xact_id FROM pgpilot.query_events") == [(2,)]
    assert (log.written, log.dropped) == (1, 1)


def test_a_malformed_event_is_dropped_and_counted_without_harming_the_others(tmp_path, store_dsn):
    events = [make_event("SELECT 1", 1), make_event(None, 2), make_event("SELECT 2", 3, duration_us="soon")]
    events.insert(1, object())
    log = asyncio.run(_log_all(make_config(tmp_path), store_dsn, events + [make_event("SELECT 3", 4)]))

    assert fetch(store_dsn, "SELECT xact_id FROM pgpilot.query_events ORDER BY 1") == [(1,), (4,)]
    assert (log.submitted, log.written, log.dropped) == (5, 2, 3)


def test_query_stats_follow_the_written_events(tmp_path, store_dsn):
    events = [make_event(f"SELECT * FROM t WHERE id = {i}", i, duration_us=1000 * (i + 1)) for i in range(20)]
    events.append(make_event("SELECT * FROM u", 99, duration_us=50, sqlstate="42P01"))
    log = asyncio.run(_log_all(make_config(tmp_path), store_dsn, events))

    hottest, other = log.query_stats.top(2, by="total_time")
    assert (hottest["query"], hottest["calls"], hottest["total_ms"], hottest["errors"]) == \
        ("SELECT * FROM t WHERE id = $1", 20, 210.0, 0)
    assert (other["query"], other["calls"], other["errors"]) == ("SELECT * FROM u", 1, 1)


def test_awkward_text_survives_the_trip_to_the_store(tmp_path, store_dsn):
    app_name = 'tab\there\nnew\\line "quoted" {braces}'
    params = ["a\tb", None, 'x"y\\z', "{}", "NULL", "ünï"]
    event = make_event('SELECT * FROM "we,ird""name" JOIN "back\\slash" ON true WHERE a = $1', 1,
                       protocol="extended", parameters=params, application_name=app_name, database="d\\b",
                       username="ünïcode", client_addr="::1", anomaly_score=0.25, cache_outcome="bypass:volatile")
    asyncio.run(_log_all(make_config(tmp_path, parameters=True), store_dsn, [event]))

    assert fetch(store_dsn, "SELECT application_name, database, username, host(client_addr), parameters, "
                            "tables_read, anomaly_score, cache_outcome FROM pgpilot.query_events") == [
        (app_name, "d\\b", "ünïcode", "::1", params, ['we,ird"name', "back\\slash"], 0.25, "bypass:volatile")]


def test_a_client_address_that_is_not_an_ip_is_stored_as_null(tmp_path, store_dsn):
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, [make_event("SELECT 1", 1, client_addr="/tmp/.s.5432")]))
    assert fetch(store_dsn, "SELECT client_addr FROM pgpilot.query_events") == [(None,)]


def test_a_failing_before_batch_hook_does_not_stop_the_log(tmp_path, store_dsn):
    async def scenario():
        log = QueryLog(make_config(tmp_path), store_dsn, "p1")
        log.before_batch = lambda: 1 / 0
        await log.start()
        log.submit(make_event("SELECT 1", 1))
        assert await log.flush()
        await log.stop()
        return log
    log = asyncio.run(scenario())
    assert log.written == 1


def test_each_statement_of_a_group_keeps_its_own_values_and_nulls(tmp_path, store_dsn):
    # One template, session and protocol: one group row whose arrays mix values and NULLs in every field.
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    t0 = time.time()
    facts = [  # xact, offset s, duration, wait, rows, bytes, sqlstate, pid, in_xact, score
        (1, 0.0, 120, 0, 1, 60, None, 4242, False, None),
        (2, 0.25, 7_000_000, 35, None, 0, "40001", None, True, 0.75),
        (3, 0.5, 1, 0, 0, 12, None, 4243, None, 0.0),
        (4, 1.125, 99, 2, 2 ** 40, 2 ** 33, "57014", 4242, True, None),
    ]
    events = [make_event(sql, x, ts=t0 + off, duration_us=d, wait_us=w, rows=r, bytes_out=b, sqlstate=st,
                         backend_pid=pid, in_transaction=ix, anomaly_score=sc, protocol="extended")
              for x, off, d, w, r, b, st, pid, ix, sc in facts]
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, events))

    assert fetch(store_dsn, "SELECT count(*) FROM pgpilot.query_event_groups") == [(1,)]
    got = fetch(store_dsn, "SELECT xact_id, extract(epoch FROM ts)::float8, duration_us, wait_us, rows, bytes_out, "
                           "sqlstate, backend_pid, in_transaction, anomaly_score FROM pgpilot.query_events "
                           "ORDER BY xact_id")
    assert [(x, d, w, r, b, st, pid, ix, sc) for x, _, d, w, r, b, st, pid, ix, sc in got] == \
        [(x, d, w, r, b, st, pid, ix, sc) for x, _, d, w, r, b, st, pid, ix, sc in facts]
    assert all(abs(ts - (t0 + off)) < 2e-6 for (_, ts, *_), (_, off, *_) in zip(got, facts))


def test_client_addresses_keep_their_family_and_prefix(tmp_path, store_dsn):
    addrs = ["127.0.0.1", "10.1.2.3/24", "2001:db8::5", "::ffff:192.0.2.1"]
    events = [make_event("SELECT 1", i, client_addr=a) for i, a in enumerate(addrs)]
    asyncio.run(_log_all(make_config(tmp_path), store_dsn, events))
    assert fetch(store_dsn, "SELECT host(client_addr), masklen(client_addr), family(client_addr) "
                            "FROM pgpilot.query_events ORDER BY xact_id") == [
        ("127.0.0.1", 32, 4), ("10.1.2.3", 24, 4), ("2001:db8::5", 128, 6), ("::ffff:192.0.2.1", 128, 6)]


def test_a_group_past_its_size_bound_continues_in_a_new_row(tmp_path, store_dsn):
    events = [make_event("SELECT 1 FROM pgbench_branches WHERE bid = $1", i, protocol="extended")
              for i in range(2500)]
    log = asyncio.run(_log_all(make_config(tmp_path, batch_size=5000, flush_interval=5), store_dsn, events))
    assert log.written == 2500
    assert fetch(store_dsn, "SELECT count(*), sum(array_length(duration_us, 1)), max(array_length(duration_us, 1)) "
                            "FROM pgpilot.query_event_groups") == [(3, 2500, 1000)]
    assert fetch(store_dsn, "SELECT count(DISTINCT xact_id), min(xact_id), max(xact_id) FROM pgpilot.query_events") \
        == [(2500, 0, 2499)]


def test_setting_up_the_store_never_deadlocks_with_its_readers(store_dsn):
    # A proxy sets the store up whenever it (re)connects, while learners, advisors and consoles read
    # pgpilot.query_events. A reader locks the view, then the tables behind it; the set-up must never hold a lock
    # on one of those tables while it waits for another (as one multi-statement transaction, it did).
    import threading

    import asyncpg

    from proxy.logstore import ensure_schema
    with psycopg.connect(store_dsn, autocommit=True) as conn:
        ensure_schema_sync(conn)
    errors: list = []
    stop = threading.Event()

    def read():
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    conn.execute("SELECT count(*) FROM pgpilot.query_events").fetchone()
                except psycopg.Error as e:
                    errors.append(e)

    async def set_up(times: int) -> None:
        conn = await asyncpg.connect(store_dsn)
        try:
            for _ in range(times):
                await ensure_schema(conn)
        finally:
            await conn.close()

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        asyncio.run(set_up(60))
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]
