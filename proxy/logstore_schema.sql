-- The query log store: schema `pgpilot` in the log-store database.
-- Written by the proxy's log writer (query_events, templates); read by the learner and the advisors.
-- Idempotent: safe to run on every start.
CREATE SCHEMA IF NOT EXISTS pgpilot;

-- Statements are stored two ways, read as one: pgpilot.query_events (a view) has one row per statement.
--  * query_event_groups: what the proxy's writer COPYs. One row per (template, session, protocol, cache outcome,
--    rewrite) among the statements of a write, the per-statement values in arrays of equal length. A row per
--    statement cost the store's backend about 5 times as much CPU per statement (heap tuple, partition routing,
--    BRIN and WAL for each one).
--  * query_event_rows: one row per statement, for everything else: spool replays, tools and tests that INSERT
--    or COPY into pgpilot.query_events (an INSTEAD OF trigger routes them here).
-- Both are partitioned by day on ts (query_event_groups_YYYYMMDD, query_event_rows_YYYYMMDD).

-- Before the groups, query_events was itself the one-row-per-statement table: keep its rows, under the new name.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'pgpilot' AND c.relname = 'query_events' AND c.relkind IN ('r', 'p'))
       AND to_regclass('pgpilot.query_event_rows') IS NULL THEN
        ALTER TABLE pgpilot.query_events RENAME TO query_event_rows;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS pgpilot.query_event_rows (
    ts               timestamptz NOT NULL,   -- statement start as seen by the proxy
    duration_us      bigint      NOT NULL,   -- start to completion (CommandComplete/ErrorResponse) at the proxy
    wait_us          bigint      NOT NULL DEFAULT 0,  -- time spent waiting for a backend
    fingerprint      text        NOT NULL,   -- pglast fingerprint (hex), constants ignored
    kind             text        NOT NULL,   -- select, insert, update, delete, merge, ddl, utility, copy, transaction, set, other
    tables_read      text[],
    tables_written   text[],
    rows             bigint,                 -- from CommandComplete, or DataRows counted
    bytes_out        bigint,                 -- bytes sent to the client for this statement
    sqlstate         text,                   -- NULL on success
    database         text,
    username         text,
    application_name text,
    client_addr      inet,
    backend_pid      integer,
    xact_id          bigint,                 -- proxy-assigned transaction id
    in_transaction   boolean,
    protocol         text,                   -- simple | extended
    cache_outcome    text,                   -- hit | miss | bypass:<reason> | NULL
    rewrite          text,                   -- name of the rewrite applied, NULL if none
    anomaly_score    real,
    proxy_id         text,
    parameters       text[]                  -- literal values / bound parameters; only with query_log.parameters on
) PARTITION BY RANGE (ts);

-- Readers scan time windows (and group by fingerprint), so a BRIN on ts is all they need; a btree per row
-- cost the store about a third of its COPY time per event.
DROP INDEX IF EXISTS pgpilot.query_events_fingerprint_ts;
CREATE INDEX IF NOT EXISTS query_events_ts_brin ON pgpilot.query_event_rows USING brin (ts);

CREATE TABLE IF NOT EXISTS pgpilot.query_event_groups (
    ts               timestamptz NOT NULL,   -- the earliest statement start of the group
    fingerprint      text        NOT NULL,   -- shared by the group: template, session, protocol, outcome, rewrite
    kind             text        NOT NULL,
    tables_read      text[],
    tables_written   text[],
    database         text,
    username         text,
    application_name text,
    client_addr      inet,
    protocol         text,
    cache_outcome    text,
    rewrite          text,
    proxy_id         text,
    -- One element per statement, all of the same length; a NULL array stands for NULL in every element.
    offsets_us       bigint[]    NOT NULL,   -- statement start - ts, in microseconds
    duration_us      bigint[]    NOT NULL,
    wait_us          bigint[],
    rows             bigint[],
    bytes_out        bigint[],
    sqlstate         text[],
    backend_pid      integer[],
    xact_id          bigint[],
    in_transaction   boolean[],
    anomaly_score    real[],
    parameters       text[]                  -- each element a text[] literal
) PARTITION BY RANGE (ts);
CREATE INDEX IF NOT EXISTS query_event_groups_ts_brin ON pgpilot.query_event_groups USING brin (ts);
-- Out of line and uncompressed: compressing the arrays (pglz or lz4) cost the backend more than the rows saved.
ALTER TABLE pgpilot.query_event_groups
    ALTER COLUMN offsets_us SET STORAGE EXTERNAL, ALTER COLUMN duration_us SET STORAGE EXTERNAL,
    ALTER COLUMN wait_us SET STORAGE EXTERNAL, ALTER COLUMN rows SET STORAGE EXTERNAL,
    ALTER COLUMN bytes_out SET STORAGE EXTERNAL, ALTER COLUMN sqlstate SET STORAGE EXTERNAL,
    ALTER COLUMN backend_pid SET STORAGE EXTERNAL, ALTER COLUMN xact_id SET STORAGE EXTERNAL,
    ALTER COLUMN in_transaction SET STORAGE EXTERNAL, ALTER COLUMN anomaly_score SET STORAGE EXTERNAL,
    ALTER COLUMN parameters SET STORAGE EXTERNAL;

-- One row per statement carried by the proxy (one per statement of a simple Query, one per Execute): what
-- every reader uses. Filter on ts: the rows' partitions are pruned; the groups are unnested, then filtered.
CREATE OR REPLACE VIEW pgpilot.query_events AS
SELECT ts, duration_us, wait_us, fingerprint, kind, tables_read, tables_written, rows, bytes_out, sqlstate, database,
       username, application_name, client_addr, backend_pid, xact_id, in_transaction, protocol, cache_outcome,
       rewrite, anomaly_score, proxy_id, parameters
FROM pgpilot.query_event_rows
UNION ALL
SELECT g.ts + s.offset_us * interval '1 microsecond', s.duration_us, coalesce(s.wait_us, 0), g.fingerprint, g.kind,
       g.tables_read, g.tables_written, s.rows, s.bytes_out, s.sqlstate, g.database, g.username,
       g.application_name, g.client_addr, s.backend_pid, s.xact_id, s.in_transaction, g.protocol, g.cache_outcome,
       g.rewrite, s.anomaly_score, g.proxy_id, s.parameters::text[]
FROM pgpilot.query_event_groups g,
     unnest(g.offsets_us, g.duration_us, g.wait_us, g.rows, g.bytes_out, g.sqlstate, g.backend_pid, g.xact_id,
            g.in_transaction, g.anomaly_score, g.parameters)
         AS s(offset_us, duration_us, wait_us, rows, bytes_out, sqlstate, backend_pid, xact_id, in_transaction,
              anomaly_score, parameters);
ALTER VIEW pgpilot.query_events ALTER COLUMN wait_us SET DEFAULT 0;

CREATE OR REPLACE FUNCTION pgpilot.query_events_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgpilot.query_event_rows SELECT NEW.*;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER query_events_insert INSTEAD OF INSERT ON pgpilot.query_events
    FOR EACH ROW EXECUTE FUNCTION pgpilot.query_events_insert();

-- One row per template (fingerprint).
CREATE TABLE IF NOT EXISTS pgpilot.templates (
    fingerprint     text PRIMARY KEY,
    normalized_sql  text NOT NULL,           -- constants replaced by $n (pglast normalize)
    kind            text NOT NULL,
    tables_read     text[],
    tables_written  text[],
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    sample_sql      text                     -- one instance with literals; only with query_log.parameters on
);
