"""psql, the real binary, through a transaction-pooling proxy: meta-commands, scripts, errors, COPY, \\watch."""
from __future__ import annotations

import signal
import subprocess

import pytest

ROWS = 100_000


def psql(proxy, dbname: str, *args: str, input: str | None = None, timeout: float = 60):
    """Run psql against the proxy; no psqlrc, no command tags, unaligned tuples-only output."""
    return subprocess.run(
        ["psql", "-X", "-q", "-At", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", "-d", dbname, *args],
        input=input, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def proxy(module_db, module_proxy_factory):
    return module_proxy_factory(module_db, pool_size=4)


def write_rows(path, rows: int = ROWS, bad_row: int | None = None) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(f"{'x' if i == bad_row else i}\trow {i}\n")


def test_psql_describe_lists_tables_and_their_columns(proxy, module_db, pg):
    pg.psql("CREATE TABLE widgets (id int PRIMARY KEY, name text NOT NULL)", dbname=module_db)

    listing = psql(proxy, module_db, "-c", r"\d")
    detail = psql(proxy, module_db, "-P", "tuples_only=off", "-c", r"\d widgets")

    assert listing.returncode == 0, listing.stderr
    assert "public|widgets|table|postgres" in listing.stdout
    assert detail.returncode == 0, detail.stderr
    assert "id|integer||not null|" in detail.stdout
    assert "name|text||not null|" in detail.stdout
    assert "widgets_pkey" in detail.stdout


def test_psql_multi_statement_query_runs_every_statement(proxy, module_db):
    out = psql(proxy, module_db, "-c", "CREATE TABLE tally (x int); INSERT INTO tally VALUES (1), (2), (3);"
               " SELECT sum(x) FROM tally; SELECT 'done'")

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "done"]


def test_psql_multi_statement_query_with_an_error_commits_nothing(proxy, module_db, pg):
    pg.psql("CREATE TABLE ledger (x int)", dbname=module_db)

    out = psql(proxy, module_db, "-c", "INSERT INTO ledger VALUES (1); SELECT 1/0; INSERT INTO ledger VALUES (2)")

    assert out.returncode != 0
    assert "division by zero" in out.stderr
    assert pg.psql("SELECT count(*) FROM ledger", dbname=module_db).strip() == "0"


def test_psql_session_continues_after_errors(proxy, module_db):
    script = "\n".join([
        "SELECT 1/0;",
        "SELECT 'after error';",
        "BEGIN;",
        "SELECT 1/0;",
        "SELECT 'ignored';",
        "ROLLBACK;",
        "SELECT 'after rollback';",
        "SELECT no_such_column FROM pg_class LIMIT 1;",
        "SELECT 'after bad column';",
    ]) + "\n"

    out = psql(proxy, module_db, input=script)

    assert out.stdout.split("\n")[:3] == ["after error", "after rollback", "after bad column"]
    assert out.stderr.count("division by zero") == 2
    assert "current transaction is aborted" in out.stderr
    assert "no_such_column" in out.stderr


def test_psql_copy_meta_command_round_trips_100k_rows(proxy, module_db, pg, items, tmp_path):
    source, copied = tmp_path / "in.tsv", tmp_path / "out.tsv"
    write_rows(source)

    load = psql(proxy, module_db, "-c", rf"\copy items FROM '{source}'")
    dump = psql(proxy, module_db, "-c", rf"\copy (SELECT * FROM items ORDER BY id) TO '{copied}'")

    assert load.returncode == 0, load.stderr
    assert dump.returncode == 0, dump.stderr
    assert copied.read_text() == source.read_text()
    loaded = pg.psql("SELECT count(*), sum(id) FROM items", dbname=module_db).strip()
    assert loaded == f"{ROWS}|{ROWS * (ROWS - 1) // 2}"


def test_psql_copy_from_stdin_and_to_stdout_round_trip_100k_rows(proxy, module_db, pg, items, tmp_path):
    source = tmp_path / "in.tsv"
    write_rows(source)

    load = psql(proxy, module_db, "-c", "COPY items FROM STDIN", input=source.read_text())
    dump = psql(proxy, module_db, "-c", "COPY (SELECT * FROM items ORDER BY id) TO STDOUT")

    assert load.returncode == 0, load.stderr
    assert pg.psql("SELECT count(*) FROM items", dbname=module_db).strip() == str(ROWS)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout == source.read_text()


def test_psql_failed_copy_loads_nothing_and_session_continues(proxy, module_db, pg, items, tmp_path):
    source = tmp_path / "in.tsv"
    write_rows(source, bad_row=ROWS // 2)

    out = psql(proxy, module_db, input=f"\\copy items FROM '{source}'\nSELECT 'still connected';\n")

    assert "invalid input syntax for type integer" in out.stderr
    assert out.stdout.strip() == "still connected"
    assert pg.psql("SELECT count(*) FROM items", dbname=module_db).strip() == "0"


def test_psql_watch_repeats_a_query_until_interrupted(proxy, module_db):
    repeats = 20
    proc = subprocess.Popen(
        ["psql", "-X", "-q", "-At", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", "-d", module_db],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("SELECT 41 + 1 \\watch 0.05\nSELECT 'after watch';\n")
        proc.stdin.flush()
        seen = []
        while len(seen) < repeats:
            line = proc.stdout.readline()
            assert line, f"psql stopped early: {proc.stderr.read()}"
            if line.strip():
                seen.append(line.strip())
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert seen == ["42"] * repeats
    # Ctrl-C ends \watch. If it lands while a repetition is running, psql cancels it and, reading a script,
    # stops with exit code 3, exactly as against Postgres directly; otherwise it goes on with the next line.
    if proc.returncode == 0:
        assert rest.strip().split("\n")[-1] == "after watch", err
    else:
        assert proc.returncode == 3 and "Cancel request sent" in err, (proc.returncode, err)


def test_psql_runs_the_same_query_many_times_in_one_session(proxy, module_db):
    script = "".join(f"SELECT {i} * 2;\n" for i in range(500))

    out = psql(proxy, module_db, "-v", "ON_ERROR_STOP=1", input=script)

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(i * 2) for i in range(500)]
