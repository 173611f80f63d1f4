"""The scorer's feature rows are the learner's: AnomalyScorer.rows_for against proxy.features through a ServingContext."""
from __future__ import annotations

import random

import numpy as np
import pytest

from proxy.analysis import analyze, extract_literals
from proxy.config import AnomalyConfig
from proxy.features import ServingContext, TemplateStats, param_features, parameter_key, transform_many
from proxy.querylog import QueryEvent
from proxy.scoring import AnomalyScorer

KNOWN = "SELECT id, name FROM customers WHERE id = 42"
OTHER = "SELECT count(*) FROM orders WHERE status = 'paid' AND amount > 10.5"
TEXTS = (KNOWN, OTHER, "SELECT id FROM customers WHERE name = '' OR 'a'='a'",
         "SELECT 1; DROP TABLE customers_archive --", "UPDATE orders SET status = 'x' WHERE id = 7",
         "SELECT * FROM pg_user")


class LoadedStub:
    """What the scorer needs of a served model: a serving context and metadata (rows_for runs no model)."""

    session, input_name, output_name = None, "features", "variable"

    def __init__(self, context):
        self.context = context
        self.metadata = {}
        self.sha256 = "0" * 64


def context() -> ServingContext:
    templates = {
        analyze(KNOWN).fingerprint: TemplateStats(calls=500, calls_per_hour=900, mean_us=300, p50_us=250, p95_us=900,
                                                  mad_log_us=0.4, rows_p50=1, rows_mad_log=0.0, bytes_p50=60,
                                                  bytes_mad_log=0.1, error_rate=0.0, n_apps=2,
                                                  app_share={"web": 0.7, "api": 0.3},
                                                  # expected ln time: by rows and bytes, and by the id too
                                                  time_fit_rows=[5.0, 0.1, 0.05, 4.0, 7.0, 0.3],
                                                  time_fit=[5.0, 0.1, 0.05, 0.2, 0, 0, 0, 0, 0, 0, 4.0, 7.0, 0.3],
                                                  # ... and id 42 usually takes its own time (~3 ms)
                                                  key_times={parameter_key(param_features(("42",))): 8.0}),
        analyze(OTHER).fingerprint: TemplateStats(calls=40, calls_per_hour=20, mean_us=9000, p50_us=8000,
                                                  p95_us=20000, mad_log_us=None, rows_p50=1, bytes_p50=None,
                                                  error_rate=0.05, n_apps=1, app_share={"reports": 1.0}),
    }
    return ServingContext(templates, apps={"web", "api", "reports"}, clients={"10.0.0.1"})


def events(n: int, seed: int = 0) -> list[QueryEvent]:
    r = random.Random(seed)
    out, ts = [], 1_700_000_000.0
    for _ in range(n):
        ts += r.expovariate(5.0)
        sql = r.choice(TEXTS)
        failed = r.random() < 0.15
        stmt_index = r.randint(0, 1) if ";" in sql else None
        out.append(QueryEvent(
            ts=ts, duration_us=int(r.lognormvariate(6, 2)), wait_us=0, sql=sql,
            rows=None if failed or r.random() < 0.1 else r.randint(0, 5000), bytes_out=r.randint(0, 10 ** 6),
            sqlstate=r.choice(("42P01", "57014")) if failed else None, database="app", username="u",
            application_name=r.choice(("web", "api", "reports", "sqlmap")), client_addr=r.choice(("10.0.0.1", "10.9.9.9")),
            backend_pid=1, xact_id=1, in_transaction=False, protocol="simple", stmt_index=stmt_index))
    return out


def learner_rows(evs: list[QueryEvent], ctx: ServingContext, with_parameters: bool) -> np.ndarray:
    """The rows as the learner builds them from the logged events (learning.logdata.EventLog.event_dict)."""
    dicts = []
    for ev in evs:
        info = analyze(ev.sql)
        s = info.statements[ev.stmt_index] if len(info.statements) > 1 else info.statements[0]
        params = None
        if with_parameters and s.literal_count:
            start = sum(x.literal_count for x in info.statements[:info.statements.index(s)])
            params = tuple(extract_literals(ev.sql)[start:start + s.literal_count])
        dicts.append(ctx.prepare({
            "sql": s.normalized, "parameters": params, "ts": ev.ts, "fingerprint": s.fingerprint,
            "duration_us": float(ev.duration_us), "rows": float(ev.rows or 0), "bytes_out": float(ev.bytes_out),
            "sqlstate": ev.sqlstate, "application_name": ev.application_name,
            "client_addr": ev.client_addr}, s.fingerprint))
    return transform_many(dicts, "anomaly")


@pytest.mark.parametrize("with_parameters", [False, True])
def test_scorer_rows_equal_the_learners_rows(with_parameters):
    evs = events(400)
    scorer = AnomalyScorer(AnomalyConfig(), with_parameters=with_parameters)
    scorer.use_model(LoadedStub(context()))
    got = np.vstack([scorer.rows_for(evs[i:i + 37])[0] for i in range(0, len(evs), 37)])
    want = learner_rows(evs, context(), with_parameters)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rows_without_a_context_treat_every_template_and_sender_as_unknown():
    scorer = AnomalyScorer(AnomalyConfig())
    X, parts = scorer.rows_for(events(20))
    want = transform_many([{"sql": p.normalized, "template": None} for p in parts], "anomaly")
    from proxy.scoring import COL
    for name in ("hist_known", "ev_app_known", "ev_client_known", "ev_z_duration", "stmt_tables", "inj_statements"):
        np.testing.assert_array_equal(X[:, COL[name]], want[:, COL[name]])


def test_rows_built_one_by_one_equal_the_batched_rows(monkeypatch):
    evs = events(120, seed=3)
    batched = AnomalyScorer(AnomalyConfig())
    batched.use_model(LoadedStub(context()))
    want = batched.rows_for(evs)[0]
    import proxy.scoring
    monkeypatch.setattr(proxy.scoring, "BATCHED", False)   # as with event features newer than the batch path
    one_by_one = AnomalyScorer(AnomalyConfig())
    one_by_one.use_model(LoadedStub(context()))
    np.testing.assert_allclose(one_by_one.rows_for(evs)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_parameters", [False, True])
def test_rows_of_a_few_statements_equal_their_rows_in_a_whole_batch(with_parameters):
    # A batch's memo misses and new flags are a few rows, built one by one with proxy.features' own arithmetic.
    from proxy.scoring import _FEW_ROWS
    from proxy.querylog import event_record
    evs = events(200, seed=5)
    scorer = AnomalyScorer(AnomalyConfig(), with_parameters=with_parameters)
    scorer.use_model(LoadedStub(context()))
    records = [event_record(ev) for ev in evs]
    facts = scorer._collect(records, [analyze(ev.sql) for ev in evs])
    whole = scorer._matrix(records, facts)
    for start in range(0, len(facts.parts), _FEW_ROWS):
        rows = list(range(start, min(start + _FEW_ROWS, len(facts.parts))))
        np.testing.assert_allclose(scorer._matrix(records, facts, rows), whole[rows], rtol=1e-5, atol=1e-5)


def test_memoized_scores_are_those_of_the_statements_own_row_within_a_bucket():
    # A stand-in model whose score shows which template history, sender and error a row has (integer part) and
    # its duration (fraction): the memo may lend a statement the score of an earlier one of its own key only.
    from proxy.querylog import event_record
    from proxy.scoring import COL
    r = random.Random(7)
    values = [(int(r.lognormvariate(6, 2)), r.randint(0, 50), r.randint(0, 10 ** 5)) for _ in range(12)]
    # the same durations, rows and bytes from every template, sender and outcome: only the key's group tells
    evs = [QueryEvent(ts=0.0, duration_us=dur, wait_us=0, sql=sql, rows=rows, bytes_out=nbytes, sqlstate=sqlstate,
                      database="app", username="u", application_name=app, client_addr=client, backend_pid=1,
                      xact_id=1, in_transaction=False, protocol="simple")
           for dur, rows, nbytes in values for sql in (KNOWN, OTHER) for app in ("web", "sqlmap")
           for client in ("10.0.0.1", "10.9.9.9") for sqlstate in (None, "42P01")]
    r.shuffle(evs)
    for i, ev in enumerate(evs):
        ev.ts = 1_700_000_000.0 + 20 * i      # errors 20 s apart: none within another's window
    steady = [QueryEvent(ts=1_700_010_000.0 + i, duration_us=200 + 37 * i, wait_us=0, sql=KNOWN, rows=1,
                         bytes_out=60, sqlstate=None, database="app", username="u", application_name="web",
                         client_addr="10.0.0.1", backend_pid=1, xact_id=1, in_transaction=False, protocol="simple")
              for i in range(60)]
    scorer = AnomalyScorer(AnomalyConfig())
    scorer.use_model(LoadedStub(context()))

    def score(X):
        return (X[:, COL["hist_known"]] * 1000 + X[:, COL["ev_error"]] * 100 + X[:, COL["ev_client_known"]] * 10
                + X[:, COL["ev_app_known"]] + X[:, COL["ev_duration_log"]] / 100).astype(np.float64)
    scorer._run = score
    for batch in [evs[i:i + 37] for i in range(0, len(evs), 37)] + [steady[:30], steady[30:], steady[:30]]:
        records = [event_record(ev) for ev in batch]
        infos = [analyze(ev.sql) for ev in batch]
        got = scorer.score_records(records, infos)
        own = score(learner_rows(batch, context(), False))
        np.testing.assert_array_equal(np.floor(np.array(got)), np.floor(own))
        np.testing.assert_allclose(np.array(got), own, atol=1.01 / 128 / 100)
