"""Throwaway PostgreSQL and Redis servers for tests (they live in pgpilot.throwaway, which the demo uses too)."""
from pgpilot.throwaway import (  # noqa: F401
    ExternalPg, ExternalRedis, PgCluster, RedisServer, free_port, pg_bindir, stop_process, wait_for_port,
)
