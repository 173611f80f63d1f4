"""Workload analysis: template profiles, classes, scheduled templates and the report command."""
from __future__ import annotations

import json

from pglast import parser

from bench.workloads import synthetic
from learning.analysis import Thresholds, analyze_workload, learned_heavy_split_ms, periodicity
from learning.cli import main


def by_name(report: dict, app) -> dict:
    rows = {r["fingerprint"]: r for r in report["templates"]}
    out = {}
    for t in app.reads + app.writes + app.heavy + [app.scheduled]:
        fp = parser.fingerprint(t.sql)
        if fp in rows:
            out[t.name] = rows[fp]
    return out


def test_heavy_analytical_templates_are_olap_heavy_and_point_lookups_oltp_light(event_log, simulated_log):
    report = analyze_workload(event_log, Thresholds(heavy_p50_ms=2.0, olap_p50_ms=2.0))
    t = by_name(report, simulated_log.app)
    for name in ("revenue_by_country", "category_sales", "event_funnel"):
        assert (t[name]["workload_class"], t[name]["weight_class"]) == ("OLAP", "heavy"), name
    for name in ("customer_by_id_0", "product_by_id", "order_by_id"):
        assert (t[name]["workload_class"], t[name]["weight_class"]) == ("OLTP", "light"), name
    assert t["insert_order"]["workload_class"] == "OLTP"


def test_the_template_a_scheduler_runs_every_10_seconds_is_recognized_as_scheduled(event_log, simulated_log):
    t = by_name(analyze_workload(event_log), simulated_log.app)
    assert t["pending_count"]["arrival"] == "scheduled"
    assert abs(t["pending_count"]["period_s"] - synthetic.SCHEDULER_PERIOD_S) < 0.5
    assert t["customer_by_id_0"]["arrival"] == "ad-hoc"
    assert t["insert_order"]["arrival"] == "ad-hoc"


def test_periodicity_separates_a_timer_from_poisson_arrivals():
    import numpy as np
    rng = np.random.default_rng(1)
    timer = np.arange(50) * 60.0 + rng.uniform(0, 0.5, 50)
    poisson = np.cumsum(rng.exponential(60.0, 50))
    assert periodicity(timer)["regularity"] > 0.9
    assert periodicity(poisson)["regularity"] < 0.3


def test_the_learned_light_heavy_split_falls_between_the_two_groups():
    import numpy as np
    split = learned_heavy_split_ms(np.array([0.1, 0.12, 0.2, 0.15, 40.0, 80.0, 55.0]))
    assert 0.2 < split < 40.0


def test_report_command_prints_the_summary_and_writes_json(simulated_log, tmp_path, capsys):
    out = tmp_path / "workload.json"
    assert main(["--dsn", simulated_log.dsn, "--report", "--json", str(out), "--model-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "workload" in printed and "every 10s" in printed
    report = json.loads(out.read_text())
    assert report["events"] == simulated_log.summary.events
    assert {"hourly_calls", "daily_calls"} <= set(report["arrival"])
    assert report["workload"]["class"] in ("OLTP", "OLAP", "mixed")
