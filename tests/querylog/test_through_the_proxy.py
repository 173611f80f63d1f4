"""The session and the writer together: statements run through a real proxy end up in the log store."""
from __future__ import annotations

import psycopg

from tests.querylog.conftest import fetch


def logging_proxy(pg, db, proxy_factory, tmp_path, **query_log):
    """A proxy logging every statement to database db of the same cluster: (the store's DSN, the proxy)."""
    store = pg.dsn_for(db)
    return store, proxy_factory(dbname=db, query_log={"enabled": True, "dsn": store, "flush_interval": 0.05,
                                                      "spool_dir": str(tmp_path / "spool"), **query_log})


def test_statements_through_the_proxy_land_in_the_log_one_row_each(pg, fresh_db, proxy_factory, tmp_path):
    store, proxy = logging_proxy(pg, fresh_db, proxy_factory, tmp_path)
    # psycopg sends statements without parameters in the simple protocol, the others in the extended one.
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as client:
        client.execute("CREATE TABLE acc (id int PRIMARY KEY, bal int)")
        client.execute("INSERT INTO acc VALUES (1, 10), (2, 20)")
        client.execute("SELECT bal FROM acc WHERE id = %s", (1,))
        client.execute("BEGIN; UPDATE acc SET bal = bal - 1 WHERE id = 1; SELECT bal FROM acc; COMMIT")
    proxy.stop()   # a clean shutdown flushes the log

    rows = fetch(store, "SELECT e.kind, e.protocol, t.normalized_sql, e.rows, e.tables_read, e.tables_written "
                        "FROM pgpilot.query_events e JOIN pgpilot.templates t USING (fingerprint) "
                        "ORDER BY e.ts, e.xact_id")
    assert rows == [
        ("ddl", "simple", "CREATE TABLE acc (id int PRIMARY KEY, bal int)", None, [], ["acc"]),
        ("insert", "simple", "INSERT INTO acc VALUES ($1, $2), ($3, $4)", 2, [], ["acc"]),
        ("select", "extended", "SELECT bal FROM acc WHERE id = $1", 1, ["acc"], []),
        ("transaction", "simple", "BEGIN", None, [], []),
        ("update", "simple", "UPDATE acc SET bal = bal - $1 WHERE id = $2", 1, [], ["acc"]),
        ("select", "simple", "SELECT bal FROM acc", 2, ["acc"], []),
        ("transaction", "simple", "COMMIT", None, [], []),
    ]


def test_bound_parameters_are_logged_with_the_parameters_option(pg, fresh_db, proxy_factory, tmp_path):
    store, proxy = logging_proxy(pg, fresh_db, proxy_factory, tmp_path, parameters=True)
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as client:
        client.execute("CREATE TABLE acc (id int PRIMARY KEY, name text, photo bytea)")
        # %t: text format; psycopg sends a Python int in binary otherwise, stored as \x and hex like any binary value.
        client.execute("INSERT INTO acc VALUES (%t, %t, %t)", (7, "it's ünïcode", None))
        client.execute("SELECT name FROM acc WHERE id = %t AND name <> %t", (7, "x"))
        client.execute("SELECT id FROM acc WHERE photo = %b", (b"\x01\xff",))
        client.execute("SELECT id FROM acc WHERE id = %t", (8,), prepare=True)
        client.execute("SELECT id FROM acc WHERE id = %t", (9,), prepare=True)
        client.execute("SELECT 1 WHERE 'a' = 'b'")                               # simple protocol: literals
    proxy.stop()

    rows = fetch(store, "SELECT protocol, parameters FROM pgpilot.query_events WHERE kind <> 'ddl' "
                        "ORDER BY ts, xact_id")
    assert rows == [
        ("extended", ["7", "it's ünïcode", None]),
        ("extended", ["7", "x"]),
        ("extended", ["\\x01ff"]),
        ("extended", ["8"]),
        ("extended", ["9"]),
        ("simple", ["1", "a", "b"]),
    ]


def test_bound_parameters_are_not_logged_without_the_option(pg, fresh_db, proxy_factory, tmp_path):
    store, proxy = logging_proxy(pg, fresh_db, proxy_factory, tmp_path)
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as client:
        client.execute("SELECT %s::int + 1", (41,))
        client.execute("SELECT 2 WHERE 'a' = 'b'")
    proxy.stop()

    assert fetch(store, "SELECT protocol, parameters FROM pgpilot.query_events ORDER BY ts") == [
        ("extended", None), ("simple", None)]


def test_a_statement_refused_at_parse_or_bind_is_logged_with_its_error(pg, fresh_db, proxy_factory, tmp_path):
    # In the extended protocol a statement can fail before its Execute: a missing table at Parse, a value of the
    # wrong type at Bind. The server then skips the Execute; the log still gets the statement, with the SQLSTATE.
    store, proxy = logging_proxy(pg, fresh_db, proxy_factory, tmp_path)
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as client:
        client.execute("CREATE TABLE acc (id int PRIMARY KEY)")
        client.execute("INSERT INTO acc VALUES (1)")
        for sql, args in (("SELECT id FROM missing WHERE id = %s", (1,)),          # Parse: 42P01
                          ("SELECT id FROM acc WHERE id = %t", ("one",)),          # Bind: 22P02
                          ("SELECT id FROM acc WHERE id = 1 / %s", (0,)),          # Bind (planned on it): 22012
                          ("SELECT id FROM acc WHERE id / (id - %s) = 1", (1,))):  # Execute: 22012
            try:
                client.execute(sql, args)
            except psycopg.Error:
                pass
            else:
                raise AssertionError(f"{sql} did not fail")
        client.execute("SELECT id FROM acc WHERE id = %s", (1,))                   # and the session goes on
    proxy.stop()

    rows = fetch(store, "SELECT e.protocol, t.normalized_sql, e.sqlstate FROM pgpilot.query_events e "
                        "JOIN pgpilot.templates t USING (fingerprint) WHERE e.kind = 'select' ORDER BY e.ts, e.xact_id")
    assert rows == [
        ("extended", "SELECT id FROM missing WHERE id = $1", "42P01"),
        ("extended", "SELECT id FROM acc WHERE id = $1", "22P02"),
        ("extended", "SELECT id FROM acc WHERE id = $2 / $1", "22012"),
        ("extended", "SELECT id FROM acc WHERE id / (id - $1) = $2", "22012"),
        ("extended", "SELECT id FROM acc WHERE id = $1", None),
    ]
