"""A normal workload with injected anomalies replayed through a proxy serving the learner's anomaly detector.

The flags must show in SHOW ANOMALIES, in the pgpilot.anomaly log lines and in pgpilot_anomaly_flags_total,
and the proxy's scores (stored with each logged statement) must give the precision and recall that the
learner's own offline evaluation gives on the same logged statements, within 5 points.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import psycopg
import pytest

from tests.models.conftest import logged_events, models_proxy, wait_for
from tests.models.workload import (SLOW_TEMPLATE, Driver, injected_anomalies, interleave, lock_seconds_for,
                                   normal_statements, template)
from tests.ops.helpers import admin_rows, metric_samples

REPLAY_STATEMENTS = 1200


@pytest.fixture(scope="module")
def replay(pg, trained_registry):
    """The replay through a scoring, logging proxy: what the client did, what the proxy showed, and the log."""
    from learning.logdata import load_log
    from proxy.analysis import analyze
    from proxy.models import load_champion
    tr = trained_registry
    context = load_champion(tr.model_dir, "anomaly").context
    slow = context.established(analyze(template(tr.app, SLOW_TEMPLATE).sql).fingerprint)
    assert slow is not None, "the template the slow outliers use is not established in the training log"
    proxy = models_proxy(pg, tr.dbname, tr.model_dir, log_format="json",
                         query_log={"enabled": True, "flush_interval": 0.1},
                         anomaly={"log_max_per_second": 1000, "recent_flags": 5000}).start()
    before = logged_events(tr.dsn)
    groups = injected_anomalies(tr.app, seed=7, lock_seconds=lock_seconds_for(slow))
    statements = interleave(normal_statements(tr.app, REPLAY_STATEMENTS, seed=2), groups, seed=8)
    started = time.time()
    driver = Driver(proxy.dsn(tr.dbname), tr.dsn)
    try:
        models = {r["kind"]: r for r in admin_rows(proxy, "SHOW MODELS")}
        driver.run(statements)
        sent = sum(1 for s in statements if not isinstance(s, tuple)) + sum(len(g) for g in groups)
        wait_for(lambda: logged_events(tr.dsn) >= before + sent, what="the replay in the log store")
        flags = admin_rows(proxy, "SHOW ANOMALIES 1000")
        samples = metric_samples(proxy)
    finally:
        driver.close()
        proxy.stop()
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    with psycopg.connect(tr.dsn, autocommit=True) as conn:
        event_log = load_log(conn)
        stored = conn.execute("SELECT xact_id, fingerprint, anomaly_score FROM pgpilot.query_events "
                              "WHERE ts >= to_timestamp(%s)", (started,)).fetchall()
    return {"models": models, "executed": driver.executed, "flags": flags, "samples": samples,
            "log": [d for d in lines if d.get("logger") == "pgpilot.anomaly"], "event_log": event_log,
            "stored": {(x, fp): s for x, fp, s in stored}, "started": started}


def labelled_rows(event_log, executed) -> dict[int, tuple]:
    """Event index -> (label, the client's Executed) for the injected statements (the last part of a stacked one)."""
    out = {}
    for e in executed:
        # the proxy logs a statement's start, after the client sent it and before the answer was complete
        window = np.nonzero((event_log.ts >= e.sent_at - 0.0005) & (event_log.ts <= e.done_at))[0]
        assert len(window), f"injected statement not in the log: {e.sql[:80]}"
        out[int(window[-1])] = (e.label, e)
    return out


def flag_of(flags: list[dict], fingerprint: str, e) -> dict | None:
    """The SHOW ANOMALIES row of one executed statement: its template, completed while the client waited."""
    for f in flags:
        completed = f["flagged_at"].timestamp() - f["delay_ms"] / 1000
        if f["fingerprint"] == fingerprint and e.sent_at - 0.001 <= completed <= e.done_at + 0.001:
            return f
    return None


def test_the_champion_is_in_service(replay, trained_registry):
    assert replay["models"]["anomaly"]["sha256"] == trained_registry.anomaly_sha[:12]


def test_flags_show_in_show_anomalies_the_log_and_the_metric(replay):
    event_log = replay["event_log"]
    rows = labelled_rows(event_log, replay["executed"])
    threshold = replay["samples"][("pgpilot_anomaly_threshold", ())]
    delays = []
    for i, (label, e) in rows.items():
        fp = event_log.fingerprints[event_log.template[i]]
        score = replay["stored"][(int(event_log.xact[i]), fp)]
        if score < threshold:
            continue
        flag = flag_of(replay["flags"], fp, e)
        assert flag is not None, f"{label} scored {score:.2f} but is not in SHOW ANOMALIES: {e.sql[:80]}"
        assert any(d["fingerprint"] == fp and d["ts"] >= e.sent_at for d in replay["log"]), f"{label} not logged"
        delays.append((flag["flagged_at"].timestamp() - e.done_at) * 1000)
    assert len(delays) >= 0.8 * len(rows), f"only {len(delays)} of {len(rows)} injected anomalies flagged"
    counted = sum(v for (name, _), v in replay["samples"].items() if name == "pgpilot_anomaly_flags_total")
    assert counted == len(replay["flags"]) == len(replay["log"])
    # Speed is the benchmark's to judge (bench.models_overhead); this reports what the replay saw.
    print(f"\nflag delay after the client's completion: median {statistics.median(delays):.1f} ms, "
          f"max {max(delays):.1f} ms over {len(delays)} flagged injected statements")


def test_every_flag_names_a_class_and_a_reason(replay):
    assert replay["flags"]
    for f in replay["flags"]:
        assert f["class"] in ("slow_outlier", "unusual_rows", "new_template", "error_burst", "injection", "unusual")
        assert f["reason"] and f["model"] == replay["models"]["anomaly"]["sha256"]


def test_a_flag_carries_the_class_the_learners_rules_give(replay, offline):
    from proxy.features import ANOMALY_CLASSES, anomaly_signals
    event_log = replay["event_log"]
    signals = anomaly_signals(offline["data"].X_test)
    position = {int(i): k for k, i in enumerate(offline["data"].test_index)}
    checked, injections = 0, []
    for i, (label, e) in labelled_rows(event_log, replay["executed"]).items():
        flag = flag_of(replay["flags"], event_log.fingerprints[event_log.template[i]], e)
        if flag is None:
            continue
        s = signals[position[i]]
        assert flag["class"] == (ANOMALY_CLASSES[int(s.argmax())] if s.max() > 0 else "unusual"), (label, flag)
        checked += 1
        if label == "injection":
            injections.append(flag["class"])
    assert checked and injections.count("injection") >= 0.75 * len(injections), injections


@pytest.fixture(scope="module")
def offline(replay, trained_registry):
    """The learner's evaluation of the champion on the logged replay: features as it builds them, labels matched."""
    from learning import anomaly as an
    from proxy.models import load_champion
    event_log = replay["event_log"]
    rows = labelled_rows(event_log, replay["executed"])
    labels = {(int(event_log.xact[i]), event_log.fingerprints[event_log.template[i]]): label
              for i, (label, _) in rows.items()}
    train = event_log.ts <= trained_registry.train_end_ts
    test = event_log.ts >= replay["started"]
    data = an.build_dataset(event_log, train, test, labels)
    champion = load_champion(trained_registry.model_dir, "anomaly")
    return {"data": data, "scores": champion.run(data.X_test)}


def test_precision_and_recall_match_the_learners_offline_evaluation(replay, offline):
    from learning import anomaly as an
    event_log = replay["event_log"]
    data = offline["data"]
    threshold = replay["samples"][("pgpilot_anomaly_threshold", ())]
    labelled = data.labels != ""
    by_learner = an.precision_recall(offline["scores"] >= threshold, labelled)
    stored = np.array([replay["stored"][(int(event_log.xact[i]), event_log.fingerprints[event_log.template[i]])]
                       for i in data.test_index], dtype=float)
    by_proxy = an.precision_recall(np.nan_to_num(stored, nan=0.0) >= threshold, labelled)
    print(f"\noffline (learner): precision {by_learner['precision']:.3f} recall {by_learner['recall']:.3f}; "
          f"online (proxy): precision {by_proxy['precision']:.3f} recall {by_proxy['recall']:.3f} "
          f"over {int(labelled.sum())} labelled of {len(labelled)} statements")
    assert abs(by_proxy["precision"] - by_learner["precision"]) <= 0.05, (by_proxy, by_learner)
    assert abs(by_proxy["recall"] - by_learner["recall"]) <= 0.05, (by_proxy, by_learner)


def test_the_proxy_scores_are_the_learners_scores(replay, offline):
    event_log = replay["event_log"]
    stored = np.array([replay["stored"][(int(event_log.xact[i]), event_log.fingerprints[event_log.template[i]])]
                       for i in offline["data"].test_index], dtype=float)
    assert not np.isnan(stored).any(), "statements logged without a score"
    same = np.isclose(stored, offline["scores"], atol=1e-4)
    assert same.mean() >= 0.95, np.nonzero(~same)[0][:20]
