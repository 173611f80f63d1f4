"""Fixtures of the operations tests: a pgbench database shared by the tests that run pgbench through a proxy."""
from __future__ import annotations

import subprocess
import uuid

import pytest


@pytest.fixture(scope="session")
def bench_db(pg):
    """A database initialised by pgbench -i (scale 1) directly against Postgres."""
    name = "t_opsbench_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE DATABASE {name}")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, name],
                   check=True, capture_output=True, text=True)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


def start_pgbench(proxy, dbname: str, *args: str) -> subprocess.Popen:
    """pgbench through the proxy in the background; read its output with .communicate()."""
    return subprocess.Popen(
        ["pgbench", "-n", "-c", "16", "-j", "2", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres",
         *args, dbname], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
