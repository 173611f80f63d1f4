"""The performance collector: database counters, checkpointer, activity, locks, and the host when it is this machine."""
from __future__ import annotations

import datetime as dt
import socket
from collections import Counter

import psutil
import psycopg

from learning.collectors.common import APPLICATION_NAME, CollectorResult, Target, write_rows

DATABASE_COLUMNS = ("numbackends", "xact_commit", "xact_rollback", "blks_read", "blks_hit", "tup_returned",
                    "tup_fetched", "tup_inserted", "tup_updated", "tup_deleted", "conflicts", "temp_files",
                    "temp_bytes", "deadlocks", "blk_read_time", "blk_write_time", "stats_reset")
DATABASE_SQL = f"""
SELECT pg_database_size(datid) AS size_bytes, {", ".join(DATABASE_COLUMNS)}
FROM pg_stat_database WHERE datname = current_database()
"""

CHECKPOINTER_COLUMNS = ("checkpoints_timed", "checkpoints_req", "checkpoint_write_time", "checkpoint_sync_time",
                        "buffers_checkpoint", "buffers_clean", "maxwritten_clean", "buffers_backend",
                        "buffers_backend_fsync", "buffers_alloc", "stats_reset")
CHECKPOINTER_SQL = f"SELECT {', '.join(CHECKPOINTER_COLUMNS)} FROM pg_stat_bgwriter"
# PostgreSQL 17 moved the checkpointer's counters to pg_stat_checkpointer and backend writes to pg_stat_io.
CHECKPOINTER_SQL_17 = """
SELECT c.num_timed, c.num_requested, c.write_time, c.sync_time, c.buffers_written, b.buffers_clean,
       b.maxwritten_clean, NULL::bigint, NULL::bigint, b.buffers_alloc, c.stats_reset
FROM pg_stat_checkpointer c, pg_stat_bgwriter b
"""

# Client backends, leaving out the collectors' own connections (to the target and to the log store).
ACTIVITY_SQL = """
SELECT datname = current_database() AS here, coalesce(state, 'unknown') AS state, wait_event_type,
       extract(epoch FROM now() - xact_start)::float8 AS xact_age,
       CASE WHEN state = 'active' THEN extract(epoch FROM now() - query_start)::float8 END AS query_age,
       CASE WHEN wait_event_type = 'Lock' AND datname = current_database()  -- pg_blocking_pids is not cheap
            THEN cardinality(pg_blocking_pids(pid)) > 0 ELSE false END AS blocked
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND application_name IS DISTINCT FROM %(ours)s
"""
LOCKS_SQL = """
SELECT l.mode, l.granted, count(*)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = current_database() AND a.application_name IS DISTINCT FROM %(ours)s
GROUP BY l.mode, l.granted
"""


HOST_COLUMNS = ("ts", "database", "server", "hostname", "cpu_count", "cpu_user_seconds", "cpu_system_seconds",
                "cpu_idle_seconds", "cpu_iowait_seconds", "load1", "load5", "load15", "mem_total_bytes",
                "mem_available_bytes", "swap_used_bytes", "disk_read_bytes", "disk_write_bytes", "disk_reads",
                "disk_writes", "disk_busy_ms", "data_dir_total_bytes", "data_dir_free_bytes")
ACTIVITY_COLUMNS = ("ts", "database", "server", "backends", "by_state", "by_wait_event_type",
                    "longest_transaction_seconds", "longest_query_seconds", "locks_by_mode", "locks_waiting",
                    "blocked_backends", "server_connections", "server_by_state", "max_connections")

Snapshot = tuple[str, tuple[str, ...], tuple]   # table, its columns, one row


def read_database(target: Target, ts: dt.datetime) -> Snapshot:
    row = target.conn.execute(DATABASE_SQL).fetchone()
    return "database_stats", ("ts", "database", "size_bytes", *DATABASE_COLUMNS), (ts, target.name, *row)


def read_checkpointer(target: Target, ts: dt.datetime) -> Snapshot:
    sql = CHECKPOINTER_SQL_17 if target.conn.info.server_version >= 170000 else CHECKPOINTER_SQL
    row = target.conn.execute(sql).fetchone()
    return ("checkpointer_stats", ("ts", "database", "server", *CHECKPOINTER_COLUMNS),
            (ts, target.name, target.server, *row))


def read_activity(target: Target, ts: dt.datetime) -> Snapshot:
    conn = target.conn
    backends = conn.execute(ACTIVITY_SQL, {"ours": APPLICATION_NAME}).fetchall()
    here = [b for b in backends if b[0]]
    by_state = Counter(b[1] for b in here)
    # An active backend with no wait event is running on CPU.
    by_wait = Counter(b[2] or "CPU" for b in here if b[1] == "active")
    xact_ages = [b[3] for b in here if b[3] is not None]
    query_ages = [b[4] for b in here if b[4] is not None]
    locks_by_mode: Counter = Counter()
    waiting = 0
    for mode, granted, count in conn.execute(LOCKS_SQL, {"ours": APPLICATION_NAME}):
        locks_by_mode[mode] += count
        waiting += 0 if granted else count
    max_connections = int(conn.execute("SELECT current_setting('max_connections')").fetchone()[0])
    return "activity_stats", ACTIVITY_COLUMNS, (
        ts, target.name, target.server, len(here), dict(by_state), dict(by_wait), max(xact_ages, default=None),
        max(query_ages, default=None), dict(locks_by_mode), waiting, sum(1 for b in here if b[5]),
        len(backends), dict(Counter(b[1] for b in backends)), max_connections)


def _data_dir_usage(conn: psycopg.Connection) -> tuple[int | None, int | None]:
    """Total and free bytes of the file system holding the data directory, when this role may know where it is."""
    try:
        path = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
        usage = psutil.disk_usage(path)
    except (psycopg.errors.InsufficientPrivilege, OSError):
        return None, None
    return usage.total, usage.free


def read_host(target: Target, ts: dt.datetime) -> Snapshot:
    """CPU, memory and disk counters of this machine; only meaningful when PostgreSQL runs here."""
    cpu = psutil.cpu_times()
    mem = psutil.virtual_memory()
    disk = psutil.disk_io_counters()  # None where the kernel exposes no disk statistics (some containers)
    disk_counters = ((disk.read_bytes, disk.write_bytes, disk.read_count, disk.write_count,
                      getattr(disk, "busy_time", None)) if disk else (None,) * 5)
    return "host_stats", HOST_COLUMNS, (
        ts, target.name, target.server, socket.gethostname(), psutil.cpu_count(), cpu.user, cpu.system, cpu.idle,
        getattr(cpu, "iowait", None), *psutil.getloadavg(), mem.total, mem.available, psutil.swap_memory().used,
        *disk_counters, *_data_dir_usage(target.conn))


def collect(store: psycopg.Connection, target: Target, result: CollectorResult) -> None:
    """One row each in database_stats, checkpointer_stats, activity_stats, and host_stats for a local server."""
    ts = target.now()
    readers = [read_database, read_checkpointer, read_activity] + ([read_host] if target.is_local else [])
    snapshots = [read(target, ts) for read in readers]
    with store.transaction():
        for table, columns, row in snapshots:
            result.wrote(table, write_rows(store, table, columns, [row]))
