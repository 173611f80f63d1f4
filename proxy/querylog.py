"""Query events: what the proxy records for every statement, and the writer that ships them to the log store.

The session builds a QueryEvent with raw facts only (SQL text, timings, counts) and hands it to
QueryLog.submit(), which never blocks and never raises. Everything costly (fingerprint, normalization,
statement kind, tables) happens in the background writer, cached per text.
"""
from __future__ import annotations


class QueryEvent:
    __slots__ = (
        "ts", "duration_us", "wait_us", "sql", "rows", "bytes_out", "sqlstate",
        "database", "username", "application_name", "client_addr", "backend_pid",
        "xact_id", "in_transaction", "protocol", "cache_outcome", "rewrite", "anomaly_score",
        "parameters",
    )

    def __init__(self, ts: float, duration_us: int, wait_us: int, sql: str, rows: int | None,
                 bytes_out: int, sqlstate: str | None, database: str, username: str,
                 application_name: str, client_addr: str | None, backend_pid: int | None,
                 xact_id: int, in_transaction: bool, protocol: str, cache_outcome: str | None = None,
                 rewrite: str | None = None, anomaly_score: float | None = None,
                 parameters: list | None = None):
        self.ts = ts                      # time.time() at statement start
        self.duration_us = duration_us
        self.wait_us = wait_us
        self.sql = sql                    # the statement text as sent by the client
        self.rows = rows
        self.bytes_out = bytes_out
        self.sqlstate = sqlstate
        self.database = database
        self.username = username
        self.application_name = application_name
        self.client_addr = client_addr
        self.backend_pid = backend_pid
        self.xact_id = xact_id
        self.in_transaction = in_transaction
        self.protocol = protocol          # "simple" | "extended"
        self.cache_outcome = cache_outcome
        self.rewrite = rewrite
        self.anomaly_score = anomaly_score
        self.parameters = parameters      # bound parameter values (text) when query_log.parameters is on
