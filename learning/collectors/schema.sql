-- The collectors' snapshot tables: schema `pgpilot` in the log-store database, beside query_events.
-- Written by learning.collectors (pgpilot learn); read by the learner's feature builders and the advisors.
-- Every row carries `ts` (when the snapshot was taken, by the monitored server's clock) and `database`
-- (the monitored database's name as configured). Idempotent: applied on every collector run.
CREATE SCHEMA IF NOT EXISTS pgpilot;

-- One row per collector, monitored database and run: what was written and what went wrong.
CREATE TABLE IF NOT EXISTS pgpilot.collector_runs (
    ts            timestamptz NOT NULL,
    collector     text        NOT NULL,   -- statements | performance | resources | plans
    database      text        NOT NULL,
    rows_written  bigint      NOT NULL,
    seconds       double precision NOT NULL,
    notices       text[]      NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS collector_runs_ts ON pgpilot.collector_runs (ts);

-- statements: pg_stat_statements as read (cumulative counters since the last reset), one row per entry.
CREATE TABLE IF NOT EXISTS pgpilot.statement_snapshots (
    ts                timestamptz NOT NULL,
    database          text        NOT NULL,
    userid            oid         NOT NULL,
    queryid           bigint      NOT NULL,
    toplevel          boolean     NOT NULL,
    fingerprint       text,                   -- pglast fingerprint of the normalized text; joins pgpilot.templates
    calls             bigint      NOT NULL,
    total_exec_time   double precision NOT NULL,  -- milliseconds
    mean_exec_time    double precision NOT NULL,  -- milliseconds
    rows              bigint      NOT NULL,
    shared_blks_hit   bigint      NOT NULL,
    shared_blks_read  bigint      NOT NULL,
    temp_blks_read    bigint      NOT NULL,
    temp_blks_written bigint      NOT NULL,
    wal_records       bigint      NOT NULL,
    wal_bytes         numeric     NOT NULL,
    stats_reset       timestamptz              -- pg_stat_statements_info.stats_reset at snapshot time
);
CREATE INDEX IF NOT EXISTS statement_snapshots_database_ts ON pgpilot.statement_snapshots (database, ts);

-- statements: what happened between two consecutive snapshots, one row per entry that was called.
CREATE TABLE IF NOT EXISTS pgpilot.statement_deltas (
    ts                timestamptz NOT NULL,   -- the later snapshot
    prev_ts           timestamptz NOT NULL,   -- the earlier snapshot
    database          text        NOT NULL,
    userid            oid         NOT NULL,
    queryid           bigint      NOT NULL,
    toplevel          boolean     NOT NULL,
    fingerprint       text,
    basis             text        NOT NULL,   -- previous: later minus earlier | new: entry absent before | reset: counters restarted
    calls             bigint      NOT NULL,
    total_exec_time   double precision NOT NULL,
    mean_exec_time    double precision NOT NULL,  -- total_exec_time / calls over the interval
    rows              bigint      NOT NULL,
    shared_blks_hit   bigint      NOT NULL,
    shared_blks_read  bigint      NOT NULL,
    temp_blks_read    bigint      NOT NULL,
    temp_blks_written bigint      NOT NULL,
    wal_records       bigint      NOT NULL,
    wal_bytes         numeric     NOT NULL
);
CREATE INDEX IF NOT EXISTS statement_deltas_fingerprint_ts ON pgpilot.statement_deltas (fingerprint, ts);
CREATE INDEX IF NOT EXISTS statement_deltas_database_ts ON pgpilot.statement_deltas (database, ts);

-- statements: the normalized text of each pg_stat_statements entry, kept once instead of per snapshot.
CREATE TABLE IF NOT EXISTS pgpilot.statement_texts (
    database     text        NOT NULL,
    queryid      bigint      NOT NULL,
    fingerprint  text,
    query        text        NOT NULL,
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    PRIMARY KEY (database, queryid)
);

-- performance: pg_stat_database for the monitored database (cumulative counters).
CREATE TABLE IF NOT EXISTS pgpilot.database_stats (
    ts                timestamptz NOT NULL,
    database          text        NOT NULL,
    size_bytes        bigint,
    numbackends       integer,
    xact_commit       bigint,
    xact_rollback     bigint,
    blks_read         bigint,
    blks_hit          bigint,
    tup_returned      bigint,
    tup_fetched       bigint,
    tup_inserted      bigint,
    tup_updated       bigint,
    tup_deleted       bigint,
    conflicts         bigint,
    temp_files        bigint,
    temp_bytes        bigint,
    deadlocks         bigint,
    blk_read_time     double precision,       -- milliseconds (needs track_io_timing)
    blk_write_time    double precision,
    stats_reset       timestamptz
);
CREATE INDEX IF NOT EXISTS database_stats_database_ts ON pgpilot.database_stats (database, ts);

-- performance: checkpointer and background writer (server-wide, read through `database`).
CREATE TABLE IF NOT EXISTS pgpilot.checkpointer_stats (
    ts                     timestamptz NOT NULL,
    database               text        NOT NULL,
    server                 text        NOT NULL,   -- host:port
    checkpoints_timed      bigint,
    checkpoints_req        bigint,
    checkpoint_write_time  double precision,       -- milliseconds
    checkpoint_sync_time   double precision,
    buffers_checkpoint     bigint,
    buffers_clean          bigint,
    maxwritten_clean       bigint,
    buffers_backend        bigint,                 -- NULL from PostgreSQL 17 (moved to pg_stat_io)
    buffers_backend_fsync  bigint,
    buffers_alloc          bigint,
    stats_reset            timestamptz
);
CREATE INDEX IF NOT EXISTS checkpointer_stats_database_ts ON pgpilot.checkpointer_stats (database, ts);

-- performance: pg_stat_activity and pg_locks summarized (point-in-time gauges, not counters).
CREATE TABLE IF NOT EXISTS pgpilot.activity_stats (
    ts                           timestamptz NOT NULL,
    database                     text        NOT NULL,
    server                       text        NOT NULL,
    backends                     integer     NOT NULL,  -- client backends connected to this database
    by_state                     jsonb       NOT NULL,  -- {"active": n, "idle": n, "idle in transaction": n, ...}
    by_wait_event_type           jsonb       NOT NULL,  -- active backends by wait_event_type ("CPU" when not waiting)
    longest_transaction_seconds  double precision,      -- oldest open transaction in this database
    longest_query_seconds        double precision,      -- longest-running active statement
    locks_by_mode                jsonb       NOT NULL,  -- locks held or awaited in this database, by mode
    locks_waiting                integer     NOT NULL,  -- lock requests not granted
    blocked_backends             integer     NOT NULL,  -- backends with a non-empty pg_blocking_pids()
    server_connections           integer     NOT NULL,  -- all client backends on the server
    server_by_state              jsonb       NOT NULL,
    max_connections              integer     NOT NULL
);
CREATE INDEX IF NOT EXISTS activity_stats_database_ts ON pgpilot.activity_stats (database, ts);

-- performance: the host PostgreSQL runs on (only when that is this machine), cumulative counters from psutil.
CREATE TABLE IF NOT EXISTS pgpilot.host_stats (
    ts                 timestamptz NOT NULL,
    database           text        NOT NULL,
    server             text        NOT NULL,
    hostname           text        NOT NULL,
    cpu_count          integer,
    cpu_user_seconds   double precision,
    cpu_system_seconds double precision,
    cpu_idle_seconds   double precision,
    cpu_iowait_seconds double precision,
    load1              double precision,
    load5              double precision,
    load15             double precision,
    mem_total_bytes    bigint,
    mem_available_bytes bigint,
    swap_used_bytes    bigint,
    disk_read_bytes    bigint,
    disk_write_bytes   bigint,
    disk_reads         bigint,
    disk_writes        bigint,
    disk_busy_ms       bigint,
    data_dir_total_bytes bigint,               -- file system holding the data directory (superuser only)
    data_dir_free_bytes  bigint
);
CREATE INDEX IF NOT EXISTS host_stats_database_ts ON pgpilot.host_stats (database, ts);

-- resources: one row per user table (sizes, cache hits, scans, tuples, bloat).
CREATE TABLE IF NOT EXISTS pgpilot.table_stats (
    ts                 timestamptz NOT NULL,
    database           text        NOT NULL,
    relid              oid         NOT NULL,
    schemaname         text        NOT NULL,
    relname            text        NOT NULL,
    relkind            "char"      NOT NULL,
    total_bytes        bigint,     -- pg_total_relation_size: heap + indexes + TOAST
    table_bytes        bigint,     -- pg_relation_size: main fork of the heap
    indexes_bytes      bigint,
    toast_bytes        bigint,
    n_live_tup         bigint,
    n_dead_tup         bigint,
    seq_scan           bigint,
    seq_tup_read       bigint,
    idx_scan           bigint,
    idx_tup_fetch      bigint,
    n_tup_ins          bigint,
    n_tup_upd          bigint,
    n_tup_del          bigint,
    n_tup_hot_upd      bigint,
    n_mod_since_analyze bigint,
    heap_blks_read     bigint,
    heap_blks_hit      bigint,
    heap_hit_ratio     double precision,   -- hit / (hit + read), NULL before any access
    idx_blks_read      bigint,
    idx_blks_hit       bigint,
    idx_hit_ratio      double precision,
    last_vacuum        timestamptz,
    last_autovacuum    timestamptz,
    last_analyze       timestamptz,
    last_autoanalyze   timestamptz,
    fillfactor         integer,
    bloat_percent      double precision,   -- dead tuples + free space, % of the heap (see docs/logstore.md)
    bloat_bytes        bigint,
    bloat_method       text                -- pgstattuple_approx | statistical | NULL (no estimate)
);
CREATE INDEX IF NOT EXISTS table_stats_database_ts ON pgpilot.table_stats (database, ts);

-- resources: one row per user index.
CREATE TABLE IF NOT EXISTS pgpilot.index_stats (
    ts             timestamptz NOT NULL,
    database       text        NOT NULL,
    indexrelid     oid         NOT NULL,
    relid          oid         NOT NULL,
    schemaname     text        NOT NULL,
    relname        text        NOT NULL,
    indexrelname   text        NOT NULL,
    index_bytes    bigint,
    idx_scan       bigint,
    idx_tup_read   bigint,
    idx_tup_fetch  bigint,
    idx_blks_read  bigint,
    idx_blks_hit   bigint,
    hit_ratio      double precision,
    is_unique      boolean     NOT NULL,
    is_primary     boolean     NOT NULL,
    is_valid       boolean     NOT NULL,
    unused         boolean     NOT NULL,   -- never scanned since the statistics reset and enforces no constraint
    definition     text        NOT NULL    -- pg_get_indexdef
);
CREATE INDEX IF NOT EXISTS index_stats_database_ts ON pgpilot.index_stats (database, ts);

-- plans: EXPLAIN (FORMAT JSON) of frequent templates.
CREATE TABLE IF NOT EXISTS pgpilot.plans (
    ts             timestamptz NOT NULL,
    database       text        NOT NULL,
    fingerprint    text        NOT NULL,   -- pgpilot.templates.fingerprint
    source         text        NOT NULL,   -- sample: sample_sql with literals | generic: normalized_sql, generic plan
    calls          bigint      NOT NULL,   -- the count that qualified the template
    plan           jsonb       NOT NULL,   -- the top "Plan" object of EXPLAIN (FORMAT JSON)
    startup_cost   double precision NOT NULL,
    total_cost     double precision NOT NULL,
    plan_rows      double precision NOT NULL,
    plan_width     integer     NOT NULL,
    node_types     text[]      NOT NULL,   -- every node, depth first, duplicates kept
    relations      text[]      NOT NULL,   -- relations scanned, distinct
    indexes        text[]      NOT NULL,   -- indexes used, distinct
    shape_hash     text        NOT NULL    -- md5 of node types, relations and indexes: changes when the plan does
);
CREATE INDEX IF NOT EXISTS plans_fingerprint_ts ON pgpilot.plans (fingerprint, ts);
CREATE INDEX IF NOT EXISTS plans_database_ts ON pgpilot.plans (database, ts);
