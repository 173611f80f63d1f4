"""The scorer's inline lane: statements in a duration range already known to score below the threshold are counted
by their session instead of becoming records (proxy/scoring.py, "Inline lane")."""
from __future__ import annotations

import random
import subprocess

import numpy as np
import psycopg
import pytest

from proxy.analysis import Analyzer
from proxy.config import AnomalyConfig
from proxy.querylog import StatementFeed, session_info
from proxy.scoring import COL, AnomalyScorer, _buckets, bucket_span
from tests.ops.helpers import metric_samples, wait_until

SELECT = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
BAND = (700.0, 900.0)       # the stand-in model flags durations in this band (us), and nothing else


def test_bucket_span_is_exactly_the_durations_of_a_bucket():
    r = random.Random(3)
    for q in list(range(0, 1200)) + [r.randrange(1200, 2700) for _ in range(300)]:
        span = bucket_span(q)
        if span is None:
            # no whole number of microseconds falls in q: its neighbours below and above skip it
            lo = int(np.expm1(q / 128))
            got = _buckets(np.arange(max(lo - 3, 0), lo + 4, dtype=np.float64))
            assert q not in got
            continue
        lo, hi = span
        edges = np.array([lo - 1, lo, hi, hi + 1], dtype=np.float64)
        inside = np.array(sorted({lo, hi, *(r.randint(lo, hi) for _ in range(20))}), dtype=np.float64)
        assert (_buckets(inside) == q).all()
        below, first, last, above = _buckets(edges)
        assert (first, last) == (q, q)
        assert below < q < above or (lo == 0 and above > q)


class StandIn:
    """What the scorer needs of a served model, with a score that rises and falls with the duration: a statement
    is anomalous only inside BAND, so no lane may span it."""

    input_name, output_name = "features", "variable"

    def __init__(self):
        self.context = None
        self.metadata = {"threshold": 0.5}
        self.sha256 = "0" * 64
        self.session = None


def band_score(X: np.ndarray) -> np.ndarray:
    dur = np.expm1(X[:, COL["ev_duration_log"]])
    return ((dur >= BAND[0]) & (dur <= BAND[1])).astype(np.float64)


def scorer(inline: bool) -> AnomalyScorer:
    analyzer = Analyzer()
    s = AnomalyScorer(AnomalyConfig(), analyzer)
    s.use_model(StandIn())
    s._run = band_score
    s.feed = StatementFeed(analyzer, 0.04)
    s.feed.scorer = s
    s.inline = inline
    return s


def record(ts: float, dur: int, who, simple: bool, aid: int) -> tuple:
    sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = %d" % aid if simple else bytes(SELECT)
    return (ts, dur, 0, sql, 1, 71, None, who, 1, 1, False, 0 if simple else -1, None, None, None, None)


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_every_duration_in_a_lane_scores_below_the_threshold(simple):
    # Two scorers see the same statements; one opens lanes. Any duration in a lane must then score below the
    # threshold on the other one's path (the batch's memo and, for a new bucket, the model).
    r = random.Random(11)
    who = session_info("bench", "u", "lane-test-" + str(simple), "10.0.0.5")
    laned, plain = scorer(True), scorer(False)
    ts = 1_700_000_000.0
    for _ in range(40):
        batch = []
        for _ in range(200):
            ts += 0.001
            batch.append(record(ts, int(r.lognormvariate(6.3, 0.6)), who, simple, r.randint(1, 10 ** 6)))
        laned.feed.records.extend(batch)
        laned.feed.tick()
        plain.score_records(batch, plain.feed.analyse(batch))
    lanes = who.lane_q if simple else who.lane_x
    # one lane per text: the extended protocol's one text, or a simple Query's shape per number of digits
    assert len(lanes) >= 3 if simple else len(lanes) == 1, list(lanes)
    widest = 0
    for text, sizes in lanes.items():
        assert set(sizes) == {71}
        ((lo, hi, rows),) = sizes.values()
        assert rows == 1
        widest = max(widest, hi - lo)
        assert not lo <= 710 <= hi and not lo <= 890 <= hi      # the band's inside is never in a lane
        durations = sorted({lo, hi, *(r.randint(lo, hi) for _ in range(300))})
        probe = text.replace(b"0", b"7") if simple else text
        batch = [(ts + k, d, 0, probe, *record(0, 0, who, simple, 0)[4:]) for k, d in enumerate(durations)]
        got = plain.score_records(batch, plain.feed.analyse(batch))
        assert max(got) < 0.5, [(d, v) for d, v in zip(durations, got) if v >= 0.5][:5]
    assert widest > 200           # lanes span many buckets
    # the band itself is scored, and flagged, on the slow path
    batch = [record(ts, 800, who, simple, 5)]
    assert plain.score_records(batch, plain.feed.analyse(batch)) == [1.0]


def test_a_new_model_closes_every_lane():
    r = random.Random(5)
    who = session_info("bench", "u", "lane-close", "10.0.0.6")
    s = scorer(True)
    for _ in range(10):
        s.feed.records.extend(record(1e9 + k, int(r.lognormvariate(6.3, 0.6)), who, False, 1) for k in range(100))
        s.feed.tick()
    assert who.lane_x
    s.use_model(StandIn())
    assert not who.lane_x and not s._lanes


def test_a_few_records_get_the_memo_keys_numpy_gives_them():
    # A batch of up to 8 records is bucketed by bisecting the bucket table, a larger one with numpy: the keys agree,
    # also at each bucket's two ends.
    r = random.Random(9)
    who = session_info("bench", "u", "lane-keys", "10.0.0.7")
    s = scorer(True)
    values = list(range(0, 300)) + [r.randrange(10 ** k) for k in range(1, 12) for _ in range(40)]
    for q in r.sample(range(3000), 300):
        span = bucket_span(q)
        if span is not None:
            values += span
    r.shuffle(values)
    for at in range(0, len(values) - 24, 24):
        v = values[at:at + 24]
        few = [(1e9, v[k], 0, bytes(SELECT), v[8 + k], v[16 + k], None, who, 1, 1, False, -1, None, None, None, None)
               for k in range(8)]
        keys_few, _ = s._memo_keys(few, s._collect(few, s.feed.analyse(few)))
        many = few + few
        keys_many, _ = s._memo_keys(many, s._collect(many, s.feed.analyse(many)))
        assert keys_few == keys_many[:8] == keys_many[8:]


def test_a_lane_met_beyond_a_gap_is_filled_around_but_never_over_a_high_bucket():
    # A lane around 600 us, then a statement at 640 us with unseen buckets between: the scorer scores the buckets
    # around the lane (both ends of each) and the lane grows over them, up to the band's first bucket and no further.
    who = session_info("bench", "u", "lane-fill", "10.0.0.8")
    laned, plain = scorer(True), scorer(False)
    batch = [record(1e9 + k, 600 + k % 6, who, False, 1) for k in range(60)]
    laned.feed.records.extend(batch)
    laned.feed.tick()
    ((lo, hi, _),) = who.lane_x[SELECT].values()
    assert 590 <= lo and hi <= 610
    memo = set(laned._memo)
    laned.feed.records.append(record(1e9 + 100, 640, who, False, 1))
    laned.feed.tick()
    assert len(laned._memo) == len(memo) + 1           # the new bucket only: fills keep to themselves
    ((lo, hi, _),) = who.lane_x[SELECT].values()
    # half a log unit below (600 / e^0.5 = 364), and up to the bucket holding 699 and 700 (the band's start)
    assert lo < 400 and 690 <= hi < 700, (lo, hi)
    durations = list(range(lo, hi + 1))
    probe = [(2e9 + k, d, 0, bytes(SELECT), *record(0, 0, who, False, 0)[4:]) for k, d in enumerate(durations)]
    assert max(plain.score_records(probe, plain.feed.analyse(probe))) < 0.5


# ---------------------------------------------------------------- through a proxy

def counters(proxy) -> tuple[float, float]:
    s = metric_samples(proxy)
    scored = sum(v for (name, _), v in s.items() if name == "pgpilot_anomaly_scored_total")
    return scored, s.get(("pgpilot_anomaly_scored_inline_total", ()), 0.0)


@pytest.fixture
def rules_proxy(proxy_factory, fresh_db):
    """Scoring by the learner's rules (no model), no query log: the feed serves only the scorer."""
    return proxy_factory(fresh_db, anomaly={"score_interval": 0.02}, models={"enabled": False})


def test_every_statement_is_scored_and_steady_ones_inline(rules_proxy, pg, fresh_db):
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", "postgres",
                    fresh_db], check=True, capture_output=True)
    scored, inline = wait_until(lambda: counters(rules_proxy), what="metrics")
    for protocol in ("simple", "extended", "prepared"):
        out = subprocess.run(["pgbench", "-h", rules_proxy.host, "-p", str(rules_proxy.port), "-U", "postgres", "-n",
                              "-S", "-M", protocol, "-c", "2", "-t", "1500", fresh_db],
                             capture_output=True, text=True, check=True)
        assert "number of transactions actually processed: 3000/3000" in out.stdout
        # every statement is scored once (with pgbench's own few, such as its scale query), and once the first
        # batches have opened lanes, the session counts steady ones itself (3,744 of 9,000 in all on a quiet
        # machine, 981 on a busy one)
        after, after_inline = wait_until(lambda: (c := counters(rules_proxy))[0] >= scored + 3000 and c,
                                         what="every statement scored")
        assert 3000 <= after - scored < 3010, protocol
        assert after_inline > inline, protocol
        scored, inline = after, after_inline


def test_a_failed_statement_keeps_its_senders_next_ones_out_of_the_lane(rules_proxy, fresh_db):
    sent = 0

    def scored_all():
        """(scored, inline) once every statement sent so far is scored."""
        return wait_until(lambda: (c := counters(rules_proxy))[0] >= sent and c, what="the statements scored")

    with psycopg.connect(rules_proxy.dsn(fresh_db, application_name="lane-errors"), autocommit=True) as conn:
        def steady(n):
            nonlocal sent
            for _ in range(n):
                conn.execute("SELECT 1").fetchall()
                sent += 1

        def lane_covers_most():
            before = scored_all()[1]
            steady(40)
            return scored_all()[1] - before >= 30
        wait_until(lane_covers_most, what="a lane for SELECT 1 that most of its statements fit")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        sent += 1
        scored, inline = scored_all()
        assert scored == sent
        steady(200)        # within the error window: each is a record, counted with the sender's recent error
        after_scored, after_inline = scored_all()
        assert after_scored == sent
        assert after_inline == inline


def test_the_sessions_of_one_sender_share_its_errors_also_once_forgotten():
    from proxy import querylog
    a = session_info("db1", "u", "lane-sender", "10.1.1.1")
    b = session_info("db2", "v", "lane-sender", "10.1.1.1")
    assert a.errors is b.errors
    assert session_info("db1", "u", "lane-sender", "10.1.1.2").errors is not a.errors   # another client address
    querylog._sessions.clear()        # as when 10,000 session infos are reached
    c = session_info("db3", "u", "lane-sender", "10.1.1.1")
    assert c is not a and c.errors is a.errors
