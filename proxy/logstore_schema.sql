-- The query log store: schema `pgpilot` in the log-store database.
-- Written by the proxy's log writer (query_events, templates); read by the learner and the advisors.
-- Idempotent: safe to run on every start.
CREATE SCHEMA IF NOT EXISTS pgpilot;

-- One row per statement carried by the proxy (one per statement of a simple Query, one per Execute).
CREATE TABLE IF NOT EXISTS pgpilot.query_events (
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
CREATE INDEX IF NOT EXISTS query_events_ts_brin ON pgpilot.query_events USING brin (ts);

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
