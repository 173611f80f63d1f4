"""The stopping rule of the index selection: an index must be worth its size against what the workload costs now."""
from __future__ import annotations

import pytest

from advisors.indexes import AdvisorSettings, min_gain, workload_data_bytes

MB = 1 << 20


def test_the_bar_grows_with_the_index_size_relative_to_the_data():
    # 1% of the remaining cost at least; beyond that, min_gain_per_size x the share of the data it takes.
    assert min_gain(1000.0, 1 * MB, 100 * MB, 0.01, 0.5) == pytest.approx(10.0)
    assert min_gain(1000.0, 10 * MB, 100 * MB, 0.01, 0.5) == pytest.approx(50.0)
    assert min_gain(1000.0, 40 * MB, 100 * MB, 0.01, 0.5) == pytest.approx(200.0)
    assert min_gain(1000.0, 40 * MB, 100 * MB, 0.01, 1.0) == pytest.approx(400.0)


def test_the_bar_is_a_share_of_what_the_workload_costs_now():
    # Once earlier indexes have cut the cost to 300, the same index clears a bar 0.3 times as high, but it must
    # still save 7.5% of what is left: a saving of 20 is worth its 15 MB only while 20 is that much of the rest.
    size, data = 15 * MB, 100 * MB
    assert min_gain(300.0, size, data, 0.005, 0.5) == pytest.approx(0.3 * min_gain(1000.0, size, data, 0.005, 0.5))
    assert 20.0 < min_gain(300.0, size, data, 0.005, 0.5) < 25.0


def test_the_size_bar_can_be_turned_off():
    assert min_gain(1000.0, 90 * MB, 100 * MB, 0.005, 0.0) == pytest.approx(5.0)
    assert min_gain(1000.0, 90 * MB, 0, 0.005, 0.5) == pytest.approx(5.0)   # unknown data size: share bar only
    assert min_gain(1000.0, 90 * MB, 100 * MB, 0.0, 0.0) == 0.0


def test_every_advised_index_clears_its_bar(tpch_base, tpch_advice):
    import psycopg

    from advisors.catalog import load_catalog
    from advisors.workload import load_workload
    with psycopg.connect(tpch_base.dsn, autocommit=True) as conn:
        catalog = load_catalog(conn)
        data = workload_data_bytes(load_workload(conn, catalog, database=tpch_base.logged_as), catalog)
    settings = AdvisorSettings()
    assert data > 0 and tpch_advice.creates
    for rec in tpch_advice.creates:
        # benefit: what the workload loses without this index once all the others exist
        assert rec.benefit > min_gain(tpch_advice.cost_after, rec.size_bytes, data, settings.min_benefit_fraction,
                                      settings.min_gain_per_size), rec.definition
