"""The cache simulator and the cache admission model."""
from __future__ import annotations

import numpy as np
import pytest

from learning import cache_model as cm
from learning.logdata import template_stats, time_split

# template 0 and 1 read table 0; template 2 reads table 1; template 3 writes table 0
READS = [[0], [0], [1], []]
WRITES = [[], [], [], [0]]


def make_trace(events) -> cm.Trace:
    """events: ("r", template, key, duration_us, bytes) or ("w", template)."""
    n = len(events)
    template = np.array([e[1] for e in events])
    is_read = np.array([e[0] == "r" for e in events])
    key = np.array([e[2] if e[0] == "r" else -1 for e in events])
    dur = np.array([float(e[3]) if e[0] == "r" else 0.0 for e in events])
    nbytes = np.array([float(e[4]) if e[0] == "r" else 0.0 for e in events])
    next_use = cm._next_uses(template, is_read, key, READS, WRITES, 2)
    return cm.Trace(np.arange(n), template, is_read, ~is_read, key, dur, nbytes, next_use, READS, WRITES)


def test_a_repeated_read_hits_and_saves_its_time():
    trace = make_trace([("r", 0, 1, 500, 100), ("r", 0, 1, 400, 100)])
    r = cm.simulate(trace, "always", 1000)
    assert (r.hits, r.saved_us) == (1, 400.0)


def test_a_write_to_a_table_read_invalidates_the_cached_result():
    trace = make_trace([("r", 0, 1, 500, 100), ("w", 3), ("r", 0, 1, 400, 100)])
    assert cm.simulate(trace, "always", 1000).hits == 0
    # a write to another table changes nothing
    trace = make_trace([("r", 2, 7, 500, 100), ("w", 3), ("r", 2, 7, 400, 100)])
    assert cm.simulate(trace, "always", 1000).hits == 1


def test_lru_by_bytes_evicts_the_least_recently_used_result():
    trace = make_trace([("r", 0, 1, 100, 60), ("r", 0, 2, 100, 60), ("r", 0, 1, 100, 60)])
    assert cm.simulate(trace, "always", 100, eviction="lru").hits == 0    # key 2 pushed key 1 out
    assert cm.simulate(trace, "always", 120, eviction="lru").hits == 1


def test_gdsf_keeps_a_costly_result_that_lru_lets_cheap_ones_push_out():
    # one 140 ms result of 45 bytes, then 50 distinct 100 us results of 10 bytes, then the costly one again
    events = [("r", 0, 1, 140_000, 45)] + [("r", 1, 100 + j, 100, 10) for j in range(50)] + [("r", 0, 1, 140_000, 45)]
    trace = make_trace(events)
    lru = cm.simulate(trace, "always", 100, eviction="lru")
    gdsf = cm.simulate(trace, "always", 100, eviction="gdsf")
    assert (lru.hits, lru.saved_us) == (0, 0.0)
    assert (gdsf.hits, gdsf.saved_us) == (1, 140_000.0)
    assert cm.simulate(trace, "always", 100).saved_us == 140_000.0    # gdsf is the default, as in the proxy


def test_gdsf_evicts_the_entry_with_fewer_hits_among_equally_valuable_ones():
    # keys 1 and 2 cost the same per byte; key 1 was hit once; key 3 needs the room of one of them
    trace = make_trace([("r", 0, 1, 100, 50), ("r", 0, 1, 100, 50), ("r", 0, 2, 100, 50), ("r", 0, 3, 101, 50),
                        ("r", 0, 1, 100, 50)])
    assert cm.simulate(trace, "always", 100, eviction="gdsf").hits == 2
    assert cm.simulate(trace, "always", 100, eviction="lru").hits == 1     # LRU let key 1 go


def test_gdsf_turns_away_a_result_worth_less_than_everything_cached():
    trace = make_trace([("r", 0, 1, 900, 50), ("r", 0, 2, 900, 50), ("r", 0, 3, 10, 50), ("r", 0, 1, 900, 50),
                        ("r", 0, 2, 900, 50)])
    r = cm.simulate(trace, "always", 100, eviction="gdsf")
    assert (r.hits, r.evictions, r.filled_bytes) == (2, 0, 100.0)


def test_gdsf_ages_out_a_costly_result_that_is_not_reused():
    # the clock rises with each eviction: cheap results eventually outrank an old costly one never hit again
    events = [("r", 0, 1, 500, 100)] + [("r", 1, 100 + j, 100, 100) for j in range(20)] + [("r", 0, 1, 500, 100)]
    trace = make_trace(events)
    assert cm.simulate(trace, "always", 200, eviction="gdsf").hits == 0
    assert cm.simulate(make_trace(events[:4] + events[-1:]), "always", 200, eviction="gdsf").hits == 1


def reference_gdsf(trace, capacity):
    """GDSF by scanning every entry: (hits, saved us) to check the simulator's lazily invalidated heap."""
    entries, clock, residency, hits, saved = {}, 0.0, 0, 0, 0.0   # key -> [priority, residency, freq, value, size, tid]
    for i in range(len(trace)):
        tid = int(trace.template[i])
        if not trace.is_read[i]:
            written = set(trace.writes_tables[tid])
            for k in [k for k, e in entries.items() if set(trace.reads_tables[e[5]]) & written]:
                del entries[k]
            continue
        k = int(trace.key[i])
        if k in entries:
            e = entries[k]
            hits, saved = hits + 1, saved + float(trace.duration_us[i])
            e[2] += 1
            e[0] = clock + e[2] * e[3]
            continue
        size = float(trace.bytes_out[i])
        value = float(trace.duration_us[i]) / max(size, 1.0)
        priority = clock + value
        used = sum(e[4] for e in entries.values())
        stored = True
        while used + size > capacity and entries:
            victim = min(entries, key=lambda x: (entries[x][0], entries[x][1]))
            if entries[victim][0] >= priority:
                clock = priority
                stored = False
                break
            clock = entries[victim][0]
            used -= entries.pop(victim)[4]
        if stored and used + size <= capacity:
            residency += 1
            entries[k] = [priority, residency, 1, value, size, tid]
    return hits, saved


def test_gdsf_with_invalidations_matches_a_scan_of_every_entry():
    rng = np.random.default_rng(3)
    events = []
    for _ in range(3000):
        if rng.random() < 0.05:
            events.append(("w", 3))
        else:
            t = int(rng.choice([0, 1, 2]))
            events.append(("r", t, int(rng.zipf(1.3)) % 400 + 1000 * t, int(rng.integers(10, 5000)),
                           int(rng.integers(1, 300))))
    # a key is one result: its cost and size are those of its first read
    first = {}
    events = [e if e[0] == "w" else (*e[:3], *first.setdefault(e[2], e[3:])) for e in events]
    trace = make_trace(events)
    for capacity in (300, 2000, 10_000):
        r = cm.simulate(trace, "always", capacity, eviction="gdsf")
        assert r.hits > 0
        assert (r.hits, r.saved_us) == reference_gdsf(trace, capacity)


def test_an_unknown_eviction_is_refused():
    with pytest.raises(ValueError):
        cm.simulate(make_trace([("r", 0, 1, 1, 1)]), "always", 10, eviction="fifo")


def test_the_oracle_keeps_what_is_reused_and_never_does_worse_than_always():
    # key 9 is big and never reused: always-cache lets it push out key 1, the oracle does not store it
    trace = make_trace([("r", 0, 1, 300, 50), ("r", 1, 9, 900, 80), ("r", 0, 1, 300, 50)])
    assert cm.simulate(trace, "always", 100).hits == 0
    assert cm.simulate(trace, "oracle", 100).hits == 1
    assert cm.simulate(trace, "model", 100, admitted={0}).hits == 1
    assert cm.simulate(trace, "never", 100).hits == 0


def test_the_next_use_stops_at_an_invalidating_write():
    trace = make_trace([("r", 0, 1, 1, 1), ("r", 0, 1, 1, 1), ("w", 3), ("r", 0, 1, 1, 1)])
    assert trace.next_use[0] == 1
    assert trace.next_use[1] == np.iinfo(np.int64).max


def test_a_warm_start_counts_only_from_the_measured_position():
    trace = make_trace([("r", 0, 1, 500, 100), ("r", 0, 1, 400, 100), ("r", 0, 1, 300, 100)])
    r = cm.simulate(trace, "always", 1000, measure_from=2)
    assert (r.reads, r.hits, r.saved_us) == (1, 1, 300.0)


def test_reuse_across_windows_counts_and_rare_templates_are_shrunk_to_the_workload_rate():
    # template 2 is read twice with one key, once in each half; template 0 reads ten distinct keys
    events = [("r", 0, k, 100, 10) for k in range(10)]
    events = events[:5] + [("r", 2, 70, 9000, 10)] + events[5:] + [("r", 2, 70, 9000, 10)]
    trace = make_trace(events)
    rate, overall = cm.reuse_rates(trace, 4)
    assert overall == 1 / 12
    assert rate[0] == (0 + cm.PRIOR_READS * overall) / (10 + cm.PRIOR_READS)
    assert rate[2] == (1 + cm.PRIOR_READS * overall) / (2 + cm.PRIOR_READS)
    assert rate[2] > rate[0]


def test_net_benefit_charges_lookups_and_bytes():
    trace = make_trace([("r", 0, 1, 500, 100), ("r", 0, 1, 400, 100)])
    r = cm.simulate(trace, "always", 1000, lookup_us=10, byte_cost_us=0.5)
    assert r.net_us == 400 - 2 * 10 - 0.5 * 100


@pytest.fixture(scope="module")
def cache_evaluation(event_log):
    train, test = time_split(event_log, 0.3)
    val = cm.window_masks(event_log, train, 6)[-1]
    fit = cm.window_samples(event_log, train & ~val, 5, 0.01)
    model = cm.fit_classifier(fit.X, fit.y, sample_weight=fit.weight)
    threshold, _ = cm.choose_threshold(model, event_log, train & ~val, val, 0.01)
    samples = cm.window_samples(event_log, train, 6, 0.01)
    model = cm.fit_classifier(samples.X, samples.y, sample_weight=samples.weight)
    rows, tids = cm.template_rows(event_log, template_stats(event_log, train))
    admitted = cm.admitted_at(model.predict_proba(rows)[:, 1], tids, threshold)
    trace = cm.build_trace(event_log, test)
    total = cm.distinct_result_bytes(trace)
    capacities = [total * 0.002, total * 0.01]
    return cm.evaluate(trace, admitted, capacities, lookup_us=20.0, byte_cost_us=0.01,
                       evictions=("gdsf", "lru")), capacities


def test_under_cache_pressure_with_lru_eviction_the_model_saves_more_than_always_caching(cache_evaluation):
    evaluation, (small, _) = cache_evaluation
    row = evaluation.by_capacity[small]
    assert row["model_lru"]["db_time_saved_s"] > row["always_lru"]["db_time_saved_s"]


def test_under_cache_pressure_gdsf_eviction_saves_more_than_lru(cache_evaluation):
    # evicting by value keeps the results that save the most per byte, whatever the admission
    evaluation, (small, _) = cache_evaluation
    row = evaluation.by_capacity[small]
    assert row["always"]["db_time_saved_s"] > row["always_lru"]["db_time_saved_s"]
    assert row["model"]["db_time_saved_s"] > row["model_lru"]["db_time_saved_s"]


def test_net_of_lookups_and_storage_the_model_beats_always_caching(cache_evaluation):
    evaluation, capacities = cache_evaluation
    for cap in capacities:
        row = evaluation.by_capacity[cap]
        assert row["model"]["net_saved_s"] > row["always"]["net_saved_s"]


def test_at_a_one_percent_cache_the_model_comes_close_to_the_oracle(cache_evaluation):
    evaluation, (_, medium) = cache_evaluation
    assert evaluation.ratio(medium, "model") >= 0.8
    assert evaluation.by_capacity[medium]["never"]["db_time_saved_s"] == 0


def test_each_cache_size_replays_the_model_with_its_own_admission_set():
    trace = make_trace([("r", 0, 1, 500, 100), ("r", 0, 1, 400, 100), ("r", 1, 2, 300, 100), ("r", 1, 2, 200, 100)])
    evaluation = cm.evaluate(trace, [{0}, {0, 1}], [1000, 2000])
    assert evaluation.by_capacity[1000]["model"]["db_time_saved_s"] == 400 / 1e6
    assert evaluation.by_capacity[2000]["model"]["db_time_saved_s"] == 600 / 1e6


def test_the_evaluation_can_show_lru_next_to_gdsf():
    events = [("r", 0, 1, 140_000, 45)] + [("r", 1, 100 + j, 100, 10) for j in range(50)] + [("r", 0, 1, 140_000, 45)]
    evaluation = cm.evaluate(make_trace(events), {0, 1}, [100], evictions=("gdsf", "lru"))
    row = evaluation.by_capacity[100]
    assert row["model"]["db_time_saved_s"] == row["always"]["db_time_saved_s"] == 0.14
    assert row["model_lru"]["db_time_saved_s"] == row["always_lru"]["db_time_saved_s"] == 0.0


def test_a_cache_large_enough_for_every_result_may_admit_every_template(event_log):
    train, _ = time_split(event_log, 0.3)
    val = cm.window_masks(event_log, train, 6)[-1]
    fit = cm.window_samples(event_log, train & ~val, 5, 0.01)
    model = cm.fit_classifier(fit.X, fit.y, sample_weight=fit.weight)
    chosen = cm.choose_thresholds(model, event_log, train & ~val, val, (0.01, 100.0))
    assert len(chosen) == 2
    small, huge = chosen
    assert [r["threshold"] for r in huge[1]] == list(cm.THRESHOLDS) and 0.0 in cm.THRESHOLDS
    # with room for everything, no threshold saves more than admitting every template
    best_huge = max(r["saved_s"] for r in huge[1])
    assert next(r["saved_s"] for r in huge[1] if r["threshold"] == 0.0) == pytest.approx(best_huge)
