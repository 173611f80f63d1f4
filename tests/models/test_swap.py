"""Hot swaps: a new champion replaces the old one under a running pgbench without a single client error, and a
corrupt or unloadable champion is refused while scoring goes on with the model in service."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.models.conftest import logged_events, wait_for
from tests.ops.helpers import admin_rows, metric_samples
from tests.support.proxy import ProxyProcess, upstream_entry


def write_pointer(model_dir: Path, kind: str, pointer: dict) -> None:
    """Replace a champion pointer the way the registry does: a new file renamed over the old one."""
    path = model_dir / "champions" / f"{kind}.json"
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(pointer, f)
    os.replace(tmp, path)


def models_row(proxy, kind: str = "anomaly") -> dict:
    return next(r for r in admin_rows(proxy, "SHOW MODELS") if r["kind"] == kind)


def pgbench(pg, *args: str, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [str(pg.bindir / "pgbench"), *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def pgbench_models(pg, tmp_path_factory):
    """A pgbench database, its traffic logged through a proxy, and two anomaly models trained on that log."""
    from learning.logdata import load_log, time_split
    from learning.pipeline import LearnSettings, train_anomaly_model
    from learning.registry import Registry
    from proxy.config import LearningConfig
    dbname = "swap_" + os.urandom(5).hex()
    pg.psql(f"CREATE DATABASE {dbname}")
    pgbench(pg, "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, dbname)
    model_dir = tmp_path_factory.mktemp("swap-registry")
    proxy = ProxyProcess({"databases": {dbname: upstream_entry(pg, dbname)},
                          "query_log": {"enabled": True, "flush_interval": 0.1},
                          "anomaly": {"enabled": False}, "models": {"enabled": False}}).start()
    try:
        for script in ("-S", "-N"):
            pgbench(pg, "-n", script, "-T", "2", "-c", "4", "-h", proxy.host, "-p", str(proxy.port), "-U", pg.user,
                    dbname)
    finally:
        proxy.stop()
    dsn = pg.dsn_for(dbname)
    assert logged_events(dsn) > 1000
    with psycopg.connect(dsn, autocommit=True) as conn:
        event_log = load_log(conn)
    train, test = time_split(event_log, 0.2)
    registry = Registry(model_dir)
    shas = []
    for seed in (0, 1):
        settings = LearnSettings(dsn, str(model_dir), LearningConfig(model_dir=str(model_dir)), seed=seed)
        shas.append(train_anomaly_model(settings, registry, event_log, train, test, {}, labels={})["registry"]["sha256"])
    assert shas[0] != shas[1]
    write_pointer(model_dir, "anomaly", {**registry.champion("anomaly"), "sha256": shas[0],
                                         "context_sha256": registry.record(shas[0])["context_sha256"]})
    yield dbname, model_dir, shas
    pg.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)", check=False)


@pytest.fixture
def scoring_proxy(pg, pgbench_models, proxy_factory):
    dbname, model_dir, shas = pgbench_models
    proxy = proxy_factory(dbname, learning={"model_dir": str(model_dir)}, models={"poll_interval": 0.2})
    assert models_row(proxy)["sha256"] == shas[0][:12]
    return proxy


def test_a_new_champion_is_swapped_in_under_pgbench_without_client_errors(pg, pgbench_models, scoring_proxy):
    from learning.registry import Registry
    dbname, model_dir, shas = pgbench_models
    proxy = scoring_proxy
    pointer = json.loads((model_dir / "champions" / "anomaly.json").read_text())
    bench = pgbench(pg, "-n", "-S", "-T", "6", "-c", "8", "-j", "2", "-h", proxy.host, "-p", str(proxy.port), "-U",
                    pg.user, dbname, background=True)
    try:
        wait_for(lambda: metric_samples(proxy).get(("pgpilot_anomaly_scored_total", (("source", "model"),)), 0) > 100,
                 what="scoring under pgbench")
        promoted, reason = Registry(model_dir).promote("anomaly", shas[1], metric="f1", score=1.0,
                                                       champion_score=None, higher_is_better=True)
        assert promoted, reason
        wait_for(lambda: models_row(proxy)["sha256"] == shas[1][:12], what="the new champion in service")
        scored_after_swap = metric_samples(proxy)[("pgpilot_anomaly_scored_total", (("source", "model"),))]
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
        write_pointer(model_dir, "anomaly", pointer)
    assert bench.returncode == 0, err
    assert re.search(r"number of failed transactions: 0\b", out), out
    row = models_row(proxy)
    assert row["loads"] == 2 and row["refused"] == 0
    assert metric_samples(proxy)[("pgpilot_anomaly_scored_total", (("source", "model"),))] > scored_after_swap


@pytest.mark.parametrize("damage", ["bytes not matching their sha256", "not a model onnxruntime can load"])
def test_a_corrupt_champion_is_refused_and_scoring_goes_on_with_the_old_one(pg, pgbench_models, scoring_proxy,
                                                                            damage):
    dbname, model_dir, shas = pgbench_models
    proxy = scoring_proxy
    good = (model_dir / "objects" / f"{shas[0]}.onnx").read_bytes()
    if damage == "bytes not matching their sha256":
        sha = hashlib.sha256(b"another model").hexdigest()
        data = good[: len(good) - 100] + bytes(100)
    else:
        data = good[: len(good) // 2]
        sha = hashlib.sha256(data).hexdigest()
    (model_dir / "objects" / f"{sha}.onnx").write_bytes(data)
    pointer = json.loads((model_dir / "champions" / "anomaly.json").read_text())
    write_pointer(model_dir, "anomaly", {**pointer, "sha256": sha})
    try:
        wait_for(lambda: models_row(proxy)["refused"] == 1, what="the refusal")
        row = models_row(proxy)
        assert row["sha256"] == shas[0][:12]
        assert ("corrupt model file" if damage.startswith("bytes") else "onnxruntime cannot load") in row["last_refusal"]
        assert metric_samples(proxy)[("pgpilot_models_refused_total", (("kind", "anomaly"),))] == 1
        before = metric_samples(proxy)[("pgpilot_anomaly_scored_total", (("source", "model"),))]
        pgbench(pg, "-n", "-S", "-t", "50", "-c", "2", "-h", proxy.host, "-p", str(proxy.port), "-U", pg.user, dbname)
        wait_for(lambda: metric_samples(proxy)[("pgpilot_anomaly_scored_total", (("source", "model"),))] >= before + 100,
                 what="scoring with the model still in service")
        assert "anomaly model refused" in proxy.log()
    finally:
        write_pointer(model_dir, "anomaly", pointer)


def test_without_a_model_the_rules_flag_injections(pg, fresh_db, proxy_factory, tmp_path):
    proxy = proxy_factory(fresh_db, learning={"model_dir": str(tmp_path)})
    with psycopg.connect(proxy.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("SELECT 1 WHERE 1 = 1 OR 'a' = 'a'")
        conn.execute("SELECT 2")
    flags = wait_for(lambda: admin_rows(proxy, "SHOW ANOMALIES"), what="a flag")
    assert [(f["class"], f["model"]) for f in flags] == [("injection", "rules")]
    assert models_row(proxy)["sha256"] is None


def test_a_message_on_the_redis_channel_loads_a_new_champion_at_once(pg, pgbench_models, proxy_factory,
                                                                     redis_server):
    import redis
    dbname, model_dir, shas = pgbench_models
    proxy = proxy_factory(dbname, learning={"model_dir": str(model_dir)},
                          models={"poll_interval": 3600}, cache={"redis_url": redis_server.url, "key_prefix": "swap:"})
    assert models_row(proxy)["sha256"] == shas[0][:12]
    pointer = json.loads((model_dir / "champions" / "anomaly.json").read_text())
    write_pointer(model_dir, "anomaly", {**pointer, "sha256": shas[1]})
    try:
        client = redis.Redis.from_url(redis_server.url)
        # the subscription is made in the background after the proxy started listening: publish until heard
        wait_for(lambda: client.publish("swap:models", "anomaly") and models_row(proxy)["sha256"] == shas[1][:12],
                 what="the new champion, long before the next poll")
    finally:
        write_pointer(model_dir, "anomaly", pointer)
