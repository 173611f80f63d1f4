"""Fixtures for the advisors: a logged TPC-H (SF 0.01) database cloned per test, and a logged event-log database.

The TPC-H base database is built once per session: data from tpchgen-cli, then instances 1-5 of each of the
22 templates are run and logged (with their parameter values) as the proxy would log them. Instances 6-10
are kept aside, unseen by the advisor. Each test gets its own copy (CREATE DATABASE ... TEMPLATE), so
what one test applies never leaks into another.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import psycopg
import pytest

from bench.workloads.recorder import Recorder, Statement
from bench.workloads.tpch import TEMPLATES, load_tpch
from tests.advisors.events import create_events, event_workload

TPCH_SCALE = 0.01
LOGGED = slice(0, 5)
UNSEEN = slice(5, 10)


@dataclass
class LoggedDatabase:
    dsn: str
    dbname: str
    logged_as: str                       # the database name the query log knows it by
    instances: dict[int, list[str]]      # TPC-H: template number -> 10 instances (1-5 logged, 6-10 unseen)


@pytest.fixture(scope="session")
def tpch_base(pg):
    name = "advisors_tpch_base"
    pg.psql(f"DROP DATABASE IF EXISTS {name}")
    pg.psql(f"CREATE DATABASE {name}")
    dsn = pg.dsn_for(name)
    load_tpch(dsn, scale=TPCH_SCALE)
    rng = random.Random(20240601)
    instances = {n: [make(rng, scale=TPCH_SCALE) for _ in range(10)] for n, make in TEMPLATES.items()}
    with Recorder(dsn, dsn, log_parameters=True) as recorder:
        summary = recorder.run([Statement(sql) for n in instances for sql in instances[n][LOGGED]])
    assert summary.errors == 0
    yield LoggedDatabase(dsn, name, name, instances)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="session")
def tpch_advice(tpch_base):
    """Index advice (20 MB budget) for the logged TPC-H workload, computed once on the base database."""
    from advisors.catalog import load_catalog
    from advisors.indexes import AdvisorSettings, advise_indexes
    from advisors.workload import load_workload
    with psycopg.connect(tpch_base.dsn, autocommit=True) as conn:
        catalog = load_catalog(conn)
        workload = load_workload(conn, catalog, database=tpch_base.logged_as)
        return advise_indexes(conn, workload, catalog, 20 << 20, AdvisorSettings(), include_drops=False)


@pytest.fixture
def tpch_db(pg, tpch_base):
    """A private copy of the logged TPC-H database."""
    name = "adv_tpch_" + uuid.uuid4().hex[:8]
    pg.clone_database(tpch_base.dbname, name)
    yield LoggedDatabase(pg.dsn_for(name), name, tpch_base.logged_as, tpch_base.instances)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="session")
def events_base(pg):
    name = "advisors_events_base"
    pg.psql(f"DROP DATABASE IF EXISTS {name}")
    pg.psql(f"CREATE DATABASE {name}")
    dsn = pg.dsn_for(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_events(conn, rows=300_000)
    with Recorder(dsn, dsn, log_parameters=True) as recorder:
        summary = recorder.run(event_workload(random.Random(7)))
    assert summary.errors == 0
    yield LoggedDatabase(dsn, name, name, {})
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture
def events_db(pg, events_base):
    name = "adv_events_" + uuid.uuid4().hex[:8]
    pg.clone_database(events_base.dbname, name)
    yield LoggedDatabase(pg.dsn_for(name), name, events_base.logged_as, {})
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture
def connect():
    """connect(dsn) -> an autocommit psycopg connection closed after the test."""
    opened = []

    def make(dsn: str) -> psycopg.Connection:
        conn = psycopg.connect(dsn, autocommit=True)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()
