"""Driving the synthetic application through a proxy, with labelled anomalies whose client-side times are kept.

`Driver(dsn)` executes bench.workloads.synthetic statements through a proxy (one connection per application
name, as bench.workloads.recorder does) and records, for every labelled statement, when the client sent it
and when its answer was complete. `injected_anomalies(...)` builds the labelled mix: slow outliers of an
established template (a lock held for a moment by another session makes it wait), huge result scans of an
established paging template from an unfamiliar tool, SQL-injection payloads, error bursts and new templates
(the last three exactly as the learner's own injector makes them).
"""
from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field

import psycopg

from bench.workloads import synthetic
from bench.workloads.recorder import Recorder, Statement

SLOW_TEMPLATE = "customer_by_id_0"       # locked out for a moment to make a slow outlier
VOLUME_TEMPLATE = "recent_orders_page"   # asked for everything to make a huge result


@dataclass
class Executed:
    label: str
    sql: str
    sent_at: float
    done_at: float
    app: str
    fingerprints: list[str] = field(default_factory=list)


def template(app: synthetic.SyntheticApp, name: str) -> synthetic.Template:
    return next(t for t in app.reads + app.writes + app.heavy if t.name == name)


def normal_statements(app: synthetic.SyntheticApp, n: int, seed: int, extra_calls: int = 0) -> list[Statement]:
    """n statements of the application's normal mix, plus extra_calls each of the two templates anomalies use."""
    r = random.Random(seed)
    out = [st for st in app.statements(n, time.time())]
    for name in (SLOW_TEMPLATE, VOLUME_TEMPLATE):
        t = template(app, name)
        for _ in range(extra_calls):
            out.insert(r.randrange(len(out) + 1), Statement(t.sql, t.params(r), app=r.choice(t.apps)))
    for st in out:
        st.ts = None          # executed now, at the wall clock
    return out


class Driver:
    """Executes statements through a proxy; keeps the client-side times of the labelled ones."""

    def __init__(self, dsn: str, upstream_dsn: str):
        self.recorder = Recorder(dsn, None)
        self.upstream_dsn = upstream_dsn
        self.executed: list[Executed] = []

    def close(self) -> None:
        self.recorder.close()

    def run(self, statements) -> None:
        for item in statements:
            if isinstance(item, tuple):         # (label, statement, (table, seconds) to lock or None)
                self._labelled(*item)
            else:
                self.recorder.execute(item)

    def _labelled(self, label: str, st: Statement, lock: tuple[str, float] | None) -> None:
        release = None
        if lock:
            holder = psycopg.connect(self.upstream_dsn)
            holder.execute(f"LOCK TABLE {lock[0]} IN ACCESS EXCLUSIVE MODE")
            release = threading.Timer(lock[1], holder.commit)
            release.start()
        sent = time.time()
        self.recorder.execute(st)
        done = time.time()
        if release is not None:
            release.join()
            holder.close()
        self.executed.append(Executed(label, st.sql, sent, done, st.app))


def lock_seconds_for(stats, cap: float = 2.0) -> float:
    """How long a statement of a template with these TemplateStats must wait to be a slow outlier by the
    learner's rule (robust z >= 4, ~10x its p95, 5 ms beyond its median), with a margin, within [0.3, cap]."""
    p50, p95 = float(stats.p50_us or 1.0), float(stats.p95_us or 1.0)
    by_z = p50 * math.exp(4.5 * 1.4826 * max(float(stats.mad_log_us or 0.0), 0.25))
    need_us = max(by_z, 10 * p95, p50 + 10_000)
    return min(cap, max(0.3, 1.3 * need_us / 1e6))


def injected_anomalies(app: synthetic.SyntheticApp, seed: int, per_class: int = 6,
                       lock_seconds: float = 0.3) -> list[list[tuple]]:
    """Labelled anomalies as groups of (label, Statement, lock or None), shuffled; an error burst is one group."""
    r = random.Random(seed)
    groups = []
    slow = template(app, SLOW_TEMPLATE)
    for _ in range(per_class // 2):
        st = Statement(slow.sql, slow.params(r), app=r.choice(slow.apps))
        groups.append([("slow_outlier", st, ("customers", lock_seconds))])
    volume = template(app, VOLUME_TEMPLATE)
    for _ in range(per_class):
        groups.append([("unusual_rows", Statement(volume.sql, ["2023-06-30", "1000000"], app="sqlmap/1.7"), None)])
    for sql_template, payload in synthetic.INJECTION_PAYLOADS:
        st = Statement(sql_template.format(p=payload), None, app=r.choice(("web", "api")))
        groups.append([("injection", st, None)])
    for cls in ("error_burst", "new_template"):
        for _ in range(max(1, per_class // 2)):
            groups.append([(cls, Statement(st.sql, st.params, app=st.app), None)
                           for st in synthetic._anomaly(cls, time.time(), app, r, [])])
    r.shuffle(groups)
    return groups


def interleave(normal: list, groups: list[list], seed: int) -> list:
    """The groups of anomalies spread over the normal statements, each group's statements back to back."""
    r = random.Random(seed)
    positions = sorted(r.sample(range(len(normal) + 1), len(groups)))
    out, k = [], 0
    for i, st in enumerate(normal + [None]):
        while k < len(groups) and positions[k] == i:
            out.extend(groups[k])
            k += 1
        if st is not None:
            out.append(st)
    return out
