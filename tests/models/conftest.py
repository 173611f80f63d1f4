"""Fixtures for the models in the proxy: the synthetic application's database, a log of its normal traffic recorded
through a logging proxy, and a model registry holding an anomaly detector the learner trained on that log."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from bench.workloads import synthetic
from tests.models.workload import Driver, normal_statements
from tests.support.proxy import ProxyProcess, upstream_entry

SCALE = 0.2
TRAINING_STATEMENTS = 2500
EXTRA_CALLS = 40          # of each template the injected anomalies reuse, so that it is established
HOLDOUT = 0.2


@dataclass
class TrainedRegistry:
    dbname: str
    dsn: str
    model_dir: Path
    anomaly_sha: str
    train_end_ts: float        # the learner's training window ends here (its serving context comes from it)
    metrics: dict
    app: synthetic.SyntheticApp


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged_events(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('pgpilot.query_events') IS NOT NULL").fetchone()[0]:
            return 0
        return conn.execute("SELECT count(*) FROM pgpilot.query_events").fetchone()[0]


def models_proxy(pg, dbname: str, model_dir: Path, **config) -> ProxyProcess:
    """A proxy in front of the application database that serves the registry at model_dir."""
    config.setdefault("databases", {dbname: upstream_entry(pg, dbname)})
    learning = config.setdefault("learning", {})
    learning.setdefault("model_dir", str(model_dir))
    config.setdefault("models", {}).setdefault("poll_interval", 0.2)
    return ProxyProcess(config)


@pytest.fixture(scope="session")
def app_db(pg):
    """A database holding the synthetic application's tables (and, later, the query log)."""
    name = "models_" + uuid.uuid4().hex[:10]
    pg.psql(f"CREATE DATABASE {name}")
    synthetic.setup(pg.dsn_for(name), SCALE)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


@pytest.fixture(scope="session")
def trained_registry(pg, app_db, tmp_path_factory) -> TrainedRegistry:
    """Normal traffic logged through a proxy, then the learner's anomaly step (export, registry, promotion)."""
    from learning.logdata import load_log, time_split
    from learning.pipeline import LearnSettings, train_anomaly_model
    from learning.registry import Registry
    from proxy.config import LearningConfig

    dsn = pg.dsn_for(app_db)
    model_dir = tmp_path_factory.mktemp("registry")
    app = synthetic.SyntheticApp(scale=SCALE, seed=3)
    statements = normal_statements(app, TRAINING_STATEMENTS, seed=1, extra_calls=EXTRA_CALLS)
    proxy = models_proxy(pg, app_db, model_dir, query_log={"enabled": True, "flush_interval": 0.1},
                         anomaly={"enabled": False}, models={"enabled": False}).start()
    driver = Driver(proxy.dsn(app_db), dsn)
    try:
        driver.run(statements)
    finally:
        driver.close()
        proxy.stop()
    assert logged_events(dsn) >= len(statements), proxy.log()[-2000:]
    with psycopg.connect(dsn, autocommit=True) as conn:
        event_log = load_log(conn)
    train, test = time_split(event_log, HOLDOUT)
    cfg = LearningConfig(model_dir=str(model_dir))
    metrics = train_anomaly_model(LearnSettings(dsn, str(model_dir), cfg), Registry(model_dir), event_log, train,
                                  test, {}, labels={})
    assert metrics["registry"]["promoted"], metrics["registry"]
    return TrainedRegistry(app_db, dsn, model_dir, metrics["registry"]["sha256"], float(event_log.ts[train][-1]),
                           metrics, app)
