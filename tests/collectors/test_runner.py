"""run_collectors: the learner's entry point runs every collector, records each run and prunes old snapshots."""
from __future__ import annotations

import pytest

from learning.collectors import COLLECTORS, run_collectors
from tests.support.services import free_port


def test_every_collector_reports_rows_notices_and_seconds_and_is_recorded(app_dsn, app):
    summary = run_collectors(app_dsn)

    assert set(summary) == set(COLLECTORS)
    for name in ("statements", "performance", "resources"):
        assert summary[name]["rows"] > 0 and summary[name]["seconds"] > 0
    recorded = dict(app.execute("SELECT collector, rows_written FROM pgpilot.collector_runs").fetchall())
    assert recorded == {name: s["rows"] for name, s in summary.items()}


def test_snapshots_older_than_the_retention_are_deleted(app_dsn, app):
    run_collectors(app_dsn, only={"performance"})
    app.execute("UPDATE pgpilot.database_stats SET ts = ts - interval '31 days'")
    run_collectors(app_dsn, only={"performance"}, retention_days=30)

    assert app.execute("SELECT count(*) FROM pgpilot.database_stats").fetchone() == (1,)


def test_raw_statement_snapshots_are_kept_a_week_and_their_deltas_longer(app_dsn, app):
    run_collectors(app_dsn, only={"statements"})
    run_collectors(app_dsn, only={"statements"})
    app.execute("UPDATE pgpilot.statement_snapshots SET ts = ts - interval '8 days'")
    app.execute("UPDATE pgpilot.statement_deltas SET ts = ts - interval '8 days'")
    run_collectors(app_dsn, only={"statements"}, retention_days=30)

    old = "SELECT count(*) FROM pgpilot.{} WHERE ts < now() - interval '7 days'"
    assert app.execute(old.format("statement_snapshots")).fetchone() == (0,)
    assert app.execute(old.format("statement_deltas")).fetchone()[0] > 0


def test_an_unreachable_database_is_a_notice_not_an_error(app_dsn):
    summary = run_collectors(app_dsn, {"elsewhere": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"},
                             only={"performance"})

    assert summary["performance"]["rows"] == 0
    assert summary["performance"]["notices"][0].startswith("elsewhere: cannot connect")


def test_an_unknown_collector_name_is_refused(app_dsn):
    with pytest.raises(ValueError, match="unknown collectors: stats"):
        run_collectors(app_dsn, only={"stats"})
