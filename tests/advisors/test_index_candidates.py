"""Index shapes beyond single columns: partial indexes for a dominant constant, and the Dexter-style baseline."""
from __future__ import annotations

import random

import pytest

from advisors.catalog import load_catalog
from advisors.dexter import dexter_advise
from advisors.indexes import AdvisorSettings, advise_indexes
from advisors.whatif import IndexSpec, WhatIf
from advisors.workload import load_workload
from bench.workloads.recorder import Recorder, Statement

pytestmark = pytest.mark.timeout(120)


def make_jobs(pg, fresh_db, connect, log_parameters: bool):
    dsn = pg.dsn_for(fresh_db)
    conn = connect(dsn)
    conn.execute("""CREATE TABLE jobs (id bigserial PRIMARY KEY, status text NOT NULL, queue text NOT NULL,
                                       created_at timestamptz NOT NULL, payload text)""")
    conn.execute("""INSERT INTO jobs (status, queue, created_at, payload)
                    SELECT CASE WHEN i % 100 = 0 THEN 'pending' ELSE 'done' END, 'q' || (i % 5),
                           now() - interval '1 second' * (200000 - i), md5(i::text)
                    FROM generate_series(1, 200000) i""")
    conn.execute("VACUUM ANALYZE jobs")
    rng = random.Random(3)
    statements = [Statement(f"SELECT id, payload FROM jobs WHERE status = 'pending' AND queue = 'q{rng.randint(0, 4)}' "
                            "ORDER BY created_at LIMIT 10") for _ in range(40)]
    statements += [Statement("SELECT count(*) FROM jobs") for _ in range(5)]
    with Recorder(dsn, dsn, log_parameters=log_parameters) as recorder:
        recorder.run(statements)
    return dsn, fresh_db


@pytest.fixture
def jobs_db(pg, fresh_db, connect):
    """A job queue: 200,000 jobs of which 1% are pending, polled by queue, and a full count; values logged."""
    return make_jobs(pg, fresh_db, connect, log_parameters=True)


@pytest.fixture
def jobs_db_without_values(pg, fresh_db, connect):
    """The same job queue, logged as by default: templates only, no parameter values."""
    return make_jobs(pg, fresh_db, connect, log_parameters=False)


def test_a_constant_that_dominates_a_filter_gets_a_partial_index(jobs_db, connect):
    dsn, dbname = jobs_db
    conn = connect(dsn)
    catalog = load_catalog(conn)
    workload = load_workload(conn, catalog, database=dbname)
    advice = advise_indexes(conn, workload, catalog, 10 << 20, AdvisorSettings(), include_drops=False)

    partial = [r for r in advice.creates if r.spec.where]
    assert partial and "status = 'pending'" in partial[0].spec.where
    spec = partial[0].spec
    full_size = WhatIf(conn, catalog).size(IndexSpec(spec.table, spec.columns, table_sql=spec.table_sql))
    assert partial[0].size_bytes < full_size / 10
    conn.execute(partial[0].ddl.rstrip(";"))
    plan = conn.execute("EXPLAIN SELECT id, payload FROM jobs WHERE status = 'pending' AND queue = 'q1' "
                        "ORDER BY created_at LIMIT 10").fetchall()
    assert partial[0].index_name in " ".join(r[0] for r in plan)


def test_the_dexter_baseline_suggests_what_halves_a_query_and_nothing_for_a_full_count(jobs_db, connect):
    dsn, dbname = jobs_db
    conn = connect(dsn)
    catalog = load_catalog(conn)
    workload = load_workload(conn, catalog, database=dbname)
    whatif = WhatIf(conn, catalog)

    result = dexter_advise(whatif, workload, catalog, min_savings_pct=50)

    assert result.indexes and all(s.table == "public.jobs" and s.where is None for s in result.indexes)
    assert {s.columns[0] for s in result.indexes} <= {"status", "queue", "created_at"}
    verdicts = {fp: q["suggest"] for fp, q in result.per_query.items()}
    count_fp = next(t.fingerprint for t in workload.templates if "count" in t.normalized_sql)
    assert verdicts.get(count_fp) in (None, False)


@pytest.mark.parametrize("synthesize, source", [(True, "synthesized"), (False, "generic")])
def test_without_logged_values_templates_are_planned_from_statistics_or_generically(
        jobs_db_without_values, connect, synthesize, source):
    dsn, dbname = jobs_db_without_values
    conn = connect(dsn)
    catalog = load_catalog(conn)
    workload = load_workload(conn, catalog, database=dbname, synthesize=synthesize)
    polling = next(t for t in workload.templates if "pending" not in t.normalized_sql and "LIMIT" in t.normalized_sql)
    assert {i.source for i in polling.instances} == {source}

    advice = advise_indexes(conn, workload, catalog, 10 << 20, AdvisorSettings(), include_drops=False)

    assert advice.creates and all(r.spec.table == "public.jobs" for r in advice.creates)
    polled = next(r for r in advice.creates if any(e.fingerprint == polling.fingerprint for e in r.templates))
    effect = next(e for e in polled.templates if e.fingerprint == polling.fingerprint)
    assert effect.cost_after < 0.5 * effect.cost_before
