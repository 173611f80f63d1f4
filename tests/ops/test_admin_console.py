"""The admin console (database `pgpilot`) through psql and psycopg: typed SHOW tables, access rules, commands."""
from __future__ import annotations

import datetime as dt
import subprocess
import threading

import psycopg
import pytest

from tests.ops.helpers import admin_connect, admin_psql, admin_rows, pool_row, wait_until
from tests.proxy.helpers import backend_pid, connect
from tests.support.proxy import ProxyProcess, upstream_entry
from tests.support.wire import RawConnection, error_fields, startup_packet

SHOW_COLUMNS = {
    "SHOW POOLS": "database|pool_mode|pool_size|cl_active|cl_idle|cl_waiting|sv_active|sv_idle|sv_connecting|"
                  "sv_resetting|sv_total|maxwait_s|status",
    "SHOW CLIENTS": "id|user|database|application_name|addr|connected_at|state|txn_status|backend_pid|pinned|"
                    "wait_s|bytes_in|bytes_out",
    "SHOW SERVERS": "database|pid|state|client_id|connected_at|idle_s|prepared_statements",
    "SHOW STATS": "database|user|queries|query_errors|transactions|query_time_s|avg_query_ms|bytes_in|bytes_out",
    "SHOW DATABASES": "name|host|port|dbname|user|pool_size|server_connections|client_connections|"
                      "max_client_conn|status",
    "SHOW CONFIG": "key|value|default",
    "SHOW VERSION": "version",
    "SHOW HELP": "command|access|description",
}


@pytest.fixture(scope="module")
def proxy(pg):
    """One proxy for the tests that leave it as they found it (each test uses its own user or cleans up)."""
    proxy = ProxyProcess({"databases": {pg.dbname: upstream_entry(pg)}, "pool_size": 2,
                          "admin": {"stats_users": ["watcher"]}}).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def own_proxy(pg, proxy_factory):
    """A proxy for a test that changes its configuration or stops it."""
    return proxy_factory(pool_size=2)


@pytest.mark.parametrize("command", sorted(SHOW_COLUMNS))
def test_show_command_answers_a_table_in_psql(command, proxy, pg):
    with connect(proxy, pg.dbname) as client:
        client.execute("SELECT 1")
        out = admin_psql(proxy, command)

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == SHOW_COLUMNS[command]
    assert lines[-1].endswith("row)") or lines[-1].endswith("rows)")


def test_show_tables_carry_real_types(proxy, pg):
    with connect(proxy, pg.dbname, application_name="typed") as client:
        pid = backend_pid(client)
        client.execute("BEGIN")
        client.execute("SELECT 1")
        with admin_connect(proxy) as admin:
            cur = admin.execute("SHOW CLIENTS")
            types = {d.name: d.type_code for d in cur.description}
            mine = next(r for r in cur.fetchall() if r[3] == "typed")
        client.execute("COMMIT")

    assert (types["id"], types["user"], types["connected_at"], types["wait_s"]) == (20, 25, 1184, 701)
    row = dict(zip(types, mine))
    assert isinstance(row["connected_at"], dt.datetime) and row["connected_at"].tzinfo is not None
    assert row["state"] == "active" and row["txn_status"] == "T"
    assert row["backend_pid"] == pid


def test_show_servers_ties_a_backend_to_its_client(proxy, pg):
    with connect(proxy, pg.dbname, autocommit=False, application_name="tied") as client:
        pid = backend_pid(client)
        client_id = next(r["id"] for r in admin_rows(proxy, "SHOW CLIENTS") if r["application_name"] == "tied")
        servers = admin_rows(proxy, "SHOW SERVERS")

    mine = next(s for s in servers if s["pid"] == pid)
    assert mine["state"] == "active" and mine["client_id"] == client_id


def test_show_stats_counts_queries_per_database_and_user(proxy, pg):
    with connect(proxy, pg.dbname, user="stats_counter") as client:
        for i in range(7):
            client.execute("SELECT %s::int", (i,))

    stats = next(r for r in admin_rows(proxy, "SHOW STATS")
                 if (r["database"], r["user"]) == (pg.dbname, "stats_counter"))
    assert stats["queries"] == 7
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0


def test_show_config_masks_passwords(pg, proxy_factory):
    proxy = proxy_factory(databases={pg.dbname: {"host": pg.host, "port": pg.port, "user": pg.user,
                                                 "password": "hunter2"}})

    rows = {r["key"]: r["value"] for r in admin_rows(proxy, "SHOW CONFIG")}

    assert rows[f"databases.{pg.dbname}.password"] == "********"
    assert "hunter2" not in repr(rows)


def test_several_commands_in_one_query_answer_in_order(proxy):
    out = admin_psql(proxy, "SHOW VERSION; SHOW HELP")

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "version" and lines[1].startswith("pgpilot ")
    assert lines.index("command|access|description") > 1


def test_interactive_psql_session_ends_with_backslash_q(proxy):
    out = subprocess.run(["psql", "-X", "-A", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", "pgpilot"],
                         input="SHOW VERSION;\n\\q\n", capture_output=True, text=True, timeout=30)

    assert out.returncode == 0, out.stderr
    assert "pgpilot " in out.stdout


def test_unknown_command_is_a_syntax_error_listing_the_commands(proxy):
    with admin_connect(proxy) as admin, pytest.raises(psycopg.Error) as err:
        admin.execute("SHOW NONSENSE")

    assert err.value.sqlstate == "42601"
    hint = err.value.diag.message_hint
    assert hint.startswith("commands: SHOW ") and "CLIENTS|" in hint and "RELOAD" in hint and "KILL" in hint


def test_user_in_neither_list_is_refused(proxy):
    with RawConnection(proxy.host, proxy.port) as raw:
        raw.send(startup_packet("mallory", "pgpilot"))
        answers = raw.read_until_closed()

    errors = [error_fields(body) for kind, body in answers if kind == b"E"]
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "28000")]
    assert not any(kind == b"Z" for kind, _ in answers)


def test_stats_user_may_show(proxy):
    out = admin_psql(proxy, "SHOW POOLS", user="watcher")

    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("command", ["RELOAD", "SHUTDOWN", "PAUSE", "RESUME", "KILL 1"])
def test_stats_user_may_not_change_anything(command, proxy):
    with admin_connect(proxy, user="watcher") as admin, pytest.raises(psycopg.Error) as err:
        admin.execute(command)

    assert err.value.sqlstate == "42501"
    assert proxy.alive()


def test_kill_closes_the_client_with_57P01(proxy, pg):
    client = connect(proxy, pg.dbname, application_name="doomed")
    client.execute("SELECT 1")
    client_id = next(r["id"] for r in admin_rows(proxy, "SHOW CLIENTS") if r["application_name"] == "doomed")

    out = admin_psql(proxy, f"KILL {client_id}")

    assert out.returncode == 0, out.stderr
    with pytest.raises(psycopg.OperationalError) as err:
        client.execute("SELECT 1")
    assert err.value.sqlstate == "57P01"
    client.close()


def test_kill_of_an_unknown_client_is_an_error(proxy):
    with admin_connect(proxy) as admin, pytest.raises(psycopg.Error) as err:
        admin.execute("KILL 999999")

    assert err.value.sqlstate == "42704"


def test_pause_waits_for_open_transactions_and_resume_lets_waiting_clients_on(own_proxy, pg):
    holder = connect(own_proxy, pg.dbname, autocommit=False)
    holder.execute("SELECT 1")          # a transaction holding a backend
    pause = threading.Thread(target=admin_psql, args=(own_proxy, "PAUSE"))
    pause.start()
    wait_until(lambda: pool_row(own_proxy, pg.dbname)["status"] == "paused", what="the pool to be paused")
    assert pause.is_alive(), "PAUSE returned while a transaction still held a backend"

    holder.commit()
    pause.join(20)
    assert not pause.is_alive()
    answers = []
    newcomer = threading.Thread(target=lambda: answers.append(
        connect(own_proxy, pg.dbname).execute("SELECT 42").fetchone()[0]))
    newcomer.start()
    wait_until(lambda: pool_row(own_proxy, pg.dbname)["cl_waiting"] == 1, what="the new client to wait")
    assert answers == []

    out = admin_psql(own_proxy, "RESUME")
    newcomer.join(20)

    assert out.returncode == 0, out.stderr
    assert answers == [42]
    assert pool_row(own_proxy, pg.dbname)["status"] == "active"
    holder.close()


def test_pause_of_an_unknown_database_is_an_error(proxy):
    with admin_connect(proxy) as admin, pytest.raises(psycopg.Error) as err:
        admin.execute("PAUSE nosuchdb")

    assert err.value.sqlstate == "3D000"


def test_reload_from_the_console_applies_a_new_pool_size(own_proxy, pg):
    own_proxy.config["pool_size"] = 5
    own_proxy.write_config()

    out = admin_psql(own_proxy, "RELOAD")

    assert out.returncode == 0, out.stderr
    assert pool_row(own_proxy, pg.dbname)["pool_size"] == 5


def test_reload_of_a_broken_config_is_refused_naming_the_key_and_file(own_proxy, pg):
    own_proxy.config["pool_size"] = 0
    own_proxy.write_config()

    with admin_connect(own_proxy) as admin, pytest.raises(psycopg.Error) as err:
        admin.execute("RELOAD")

    assert err.value.sqlstate == "F0000"
    assert "pool_size" in err.value.diag.message_detail
    assert str(own_proxy.config_path) in err.value.diag.message_detail
    assert pool_row(own_proxy, pg.dbname)["pool_size"] == 2


def test_shutdown_stops_the_proxy_with_exit_status_0(own_proxy):
    out = admin_psql(own_proxy, "SHUTDOWN")

    assert out.returncode == 0, out.stderr
    own_proxy.proc.wait(20)
    assert own_proxy.proc.returncode == 0


def test_show_queries_lists_query_templates_from_the_query_log(pg, fresh_db, proxy_factory, tmp_path):
    proxy = proxy_factory(query_log={"enabled": True, "dsn": pg.dsn_for(fresh_db), "flush_interval": 0.1,
                                     "spool_dir": str(tmp_path / "spool")})
    with connect(proxy, pg.dbname) as client:
        for i in range(5):
            client.execute(f"SELECT {i} AS answer")

    rows = wait_until(lambda: [r for r in admin_rows(proxy, "SHOW QUERIES 10 calls") if r["calls"] >= 5],
                      what="the template in SHOW QUERIES")

    assert rows[0]["query"] == "SELECT $1 AS answer"   # literals are normalized away
