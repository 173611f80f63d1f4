"""`pgpilot learn`: a whole pass, the advisory lock that keeps a second learner out, rollback from the command line."""
from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from learning.cli import EXIT_LOCKED, LOCK_KEY, main, parse_interval
from proxy.models import load_champion

KINDS = ("time", "anomaly", "cache", "cluster")


@pytest.fixture
def store_copy(pg, simulated_log):
    """A copy of the simulated log's database, for runs that write collector snapshots into it."""
    name = "learncopy_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE DATABASE {name} TEMPLATE {simulated_log.dbname}")
    yield pg.dsn_for(name)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


def small_config(tmp_path, dsn: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({  # YAML is a superset of JSON
        "query_log": {"dsn": dsn},
        "learning": {"model_dir": str(tmp_path / "models"), "search_budget_seconds": 2, "cv_folds": 2,
                     "time_model_families": ["xgboost"], "max_train_rows": 4000, "explain_sample": 200,
                     "heavy_p50_ms": 2.0}}))
    return str(path)


def test_a_pass_collects_trains_and_registers_a_champion_of_every_kind(store_copy, tmp_path, capsys):
    assert main(["-c", small_config(tmp_path, store_copy), "--once", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert kind in out
        champion = load_champion(tmp_path / "models", kind)
        assert champion is not None and champion.kind == kind
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["collect", "load", "analyze", *KINDS]
    assert all(s["status"] == "ok" for s in summary["steps"])
    assert summary["models"]["time"]["onnx"]["max_abs_diff"] < 1e-3
    # the cache replays evict as the proxy's L1 is configured to (gdsf by default), with LRU beside it
    sizes = summary["models"]["cache"]["simulation"]
    assert {r["eviction"] for r in sizes} == {"gdsf"} and all("model_lru_vs_oracle" in r for r in sizes)
    with psycopg.connect(store_copy) as conn:   # the collectors ran against the configured store
        assert conn.execute("SELECT count(*) FROM pgpilot.collector_runs").fetchone()[0] > 0


def test_a_second_learner_does_nothing_while_the_first_holds_the_lock(simulated_log, tmp_path, capsys):
    with psycopg.connect(simulated_log.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        code = main(["--dsn", simulated_log.dsn, "--once", "--no-collect", "--model-dir", str(tmp_path / "m")])
        assert code == EXIT_LOCKED
        assert "another learner holds the lock" in capsys.readouterr().err
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    assert not (tmp_path / "m" / "champions").exists()


def test_rollback_without_a_previous_champion_fails_with_a_clear_message(tmp_path, capsys):
    assert main(["--rollback", "time", "--model-dir", str(tmp_path / "models")]) == 1
    assert "no champion of kind 'time'" in capsys.readouterr().err


def test_intervals_read_as_seconds():
    assert parse_interval("10m") == 600 and parse_interval("30s") == 30 and parse_interval("2h") == 7200
    assert parse_interval("45") == 45
    with pytest.raises(ValueError):
        parse_interval("ten minutes")
