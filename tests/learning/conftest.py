"""Fixtures for the learner's tests: a log store filled with a simulated application log with labelled anomalies.

The log is made by bench.workloads.recorder with the synthetic application's cost model instead of execution
(deterministic, seconds to make), in a database that also holds the application's tables, so EXPLAIN works.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
import pytest

from bench.workloads import synthetic
from bench.workloads.recorder import Recorder, virtual_start

SCALE = 0.05
STATEMENTS = 24_000


@dataclass
class SimulatedLog:
    dsn: str
    dbname: str
    app: synthetic.SyntheticApp
    summary: object


@pytest.fixture(scope="session")
def simulated_log(pg) -> SimulatedLog:
    """A database with the synthetic application's tables and a simulated, labelled log of ~24k statements."""
    name = "learn_" + uuid.uuid4().hex[:10]
    pg.psql(f"CREATE DATABASE {name}")
    dsn = pg.dsn_for(name)
    synthetic.setup(dsn, SCALE)
    app = synthetic.SyntheticApp(scale=SCALE, seed=3)
    stream = synthetic.inject_anomalies(app.statements(STATEMENTS, virtual_start(STATEMENTS, 20.0)), app,
                                        every=120, seed=5)
    with Recorder(None, dsn, simulator=app.simulate, database=name) as recorder:
        summary = recorder.run(stream)
    yield SimulatedLog(dsn, name, app, summary)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="session")
def event_log(simulated_log):
    """The simulated log loaded as the learner loads it."""
    from learning.logdata import load_log
    with psycopg.connect(simulated_log.dsn, autocommit=True) as conn:
        return load_log(conn)


@pytest.fixture(scope="session")
def labels(simulated_log):
    from learning.logdata import load_labels
    with psycopg.connect(simulated_log.dsn, autocommit=True) as conn:
        return load_labels(conn)
