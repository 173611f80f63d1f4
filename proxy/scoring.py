"""Anomaly scoring of finished statements, off the client's path: small batches every few ms, flags with reasons.

The session hands every finished statement to `AnomalyScorer.submit(event)`, which only appends it to a
buffer. A timer drains the buffer anomaly.score_interval seconds after its first statement arrived: each
statement is analysed (fingerprint and normalized text, from the cache the query log shares), turned into
the anomaly model's feature row as the learner builds it (proxy.features through the champion's
ServingContext: template history, familiar senders, the sender's recent errors), the batch is scored in one
onnxruntime call, and `event.anomaly_score` is set before the query log writes the row (it batches every
~0.5 s). A statement scoring at least the threshold is flagged with the class of its strongest rule
(proxy.features.anomaly_signals; "unusual" when the model alone saw it) and a reason in words: a
pgpilot.anomaly log line (rate-limited), a count by class, an entry in the SHOW ANOMALIES ring, and an
offer to each alert sink (webhook, NOTIFY), which never blocks.

Without a model every statement still gets the learner's rule score, limited to what needs no history
(injection shapes and error bursts), unless anomaly.rules_without_model is off.

The row's per-statement part (statement shape, template history, sender familiarity) is computed once per
(template, normalized text, application, client) with proxy.features.transform_one; only the event's own
values (time, rows, bytes, error, the sender's recent errors, parameters) are filled in per batch, with the
same arithmetic as proxy.features (tests/models/test_rows.py checks both give the same rows).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import Counter, deque

import numpy as np

from proxy.analysis import Analyzer, extract_literals
from proxy.features import (ANOMALY_CLASSES, EVENT_FEATURES, FEATURE_NAMES, PARAM_FEATURES, RecentErrors,
                            anomaly_signals, expectation_columns, param_features, transform_many, transform_one)

log = logging.getLogger("pgpilot.scoring")
flag_log = logging.getLogger("pgpilot.anomaly")

KIND = "anomaly"
NAMES = FEATURE_NAMES[KIND]
COL = {name: i for i, name in enumerate(NAMES)}
UNUSUAL = "unusual"                     # flagged by the model while no rule fires
FLAG_CLASSES = ANOMALY_CLASSES + (UNUSUAL,)
_PAR_IN_ROW = [(COL[n], PARAM_FEATURES.index(n)) for n in NAMES if n in PARAM_FEATURES]
_C_DUR, _C_ROWS, _C_BYTES, _C_ERR = (COL[n] for n in ("ev_duration_log", "ev_rows_log", "ev_bytes_log", "ev_error"))
_C_ZDUR, _C_ZROWS, _C_ZBYTES = (COL[n] for n in ("ev_z_duration", "ev_z_rows", "ev_z_bytes"))
_C_VOLUME = [_C_DUR, _C_ROWS, _C_BYTES]           # log1p of (duration, rows, bytes), in the order of the facts
_C_Z = [_C_ZDUR, _C_ZROWS, _C_ZBYTES]             # their robust z-scores against the template's history
_S_P50, _S_MAD = [1, 4, 6], [3, 5, 7]             # where StatementRow.stats keeps their medians and MADs
_C_RECENT = COL["ev_client_recent_errors"]
_C_OVER_P95, _C_EXCESS = COL.get("ev_over_p95_log10"), COL.get("ev_excess_ms")
_C_KNOWN = COL["hist_known"]
# the expected time for the statement's size and parameters, from its template's fit, and a probe-like error
_C_EXPECTED = [COL[n] for n in ("ev_expected_log", "ev_expected_mad_log", "ev_z_expected", "ev_excess_expected_ms",
                                "ev_error_probe")]
# The event features the batch path computes itself; any other (a newer proxy.features) makes the scorer build
# each row with proxy.features.transform_one instead: slower, never different.
_BATCHED_EVENT_FEATURES = frozenset({
    "ev_duration_log", "ev_rows_log", "ev_bytes_log", "ev_error", "ev_z_duration", "ev_z_rows", "ev_z_bytes",
    "ev_new_template", "ev_app_known", "ev_client_known", "ev_app_template_share", "ev_client_recent_errors",
    "ev_over_p95_log10", "ev_excess_ms", "ev_expected_log", "ev_expected_mad_log", "ev_z_expected",
    "ev_excess_expected_ms", "ev_error_probe"})
BATCHED = set(EVENT_FEATURES) <= _BATCHED_EVENT_FEATURES
_I_BURST, _I_INJECTION = ANOMALY_CLASSES.index("error_burst"), ANOMALY_CLASSES.index("injection")
assert set(EVENT_FEATURES) <= set(NAMES)
# The same constants as proxy.features' robust z-score.
_MAD_FLOOR = 0.25
_Z_CLIP = 50.0
_STATIC_LIMIT = 50_000
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class StatementRow:
    """What a batch needs of one (template, normalized text, application, client): the row's fixed part."""

    __slots__ = ("row", "fingerprint", "normalized", "template", "known", "stats", "app_known", "client_known",
                 "app", "sender")

    def __init__(self, fingerprint: str, normalized: str, template, app_known: bool, client_known: bool,
                 app: str, client: str):
        self.fingerprint = fingerprint
        self.normalized = normalized
        self.template = template
        self.app_known = app_known
        self.client_known = client_known
        self.app = app
        self.sender = f"{client}|{app}"          # as ServingContext.observe names a sender
        self.row = transform_one({"sql": normalized, "parameters": None, "template": template,
                                  "application_name": app, "app_known": app_known, "client_known": client_known},
                                 KIND)
        t = template
        self.known = t is not None and bool(t.calls)
        if self.known:
            nan = math.nan
            self.stats = (1.0, nan if t.p50_us is None else float(t.p50_us), float(t.p95_us or 0.0),
                          float(t.mad_log_us or 0.0), nan if t.rows_p50 is None else float(t.rows_p50),
                          float(t.rows_mad_log or 0.0), nan if t.bytes_p50 is None else float(t.bytes_p50),
                          float(t.bytes_mad_log or 0.0))
        else:
            self.stats = _UNKNOWN_STATS


# (known, p50_us, p95_us, mad_log_us, rows_p50, rows_mad_log, bytes_p50, bytes_mad_log) of an unknown template
_UNKNOWN_STATS = (0.0, math.nan, 0.0, 0.0, math.nan, 0.0, math.nan, 0.0)


def _lg(v: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(v, 0.0))


def _robust_z(value: np.ndarray, p50: np.ndarray, mad: np.ndarray) -> np.ndarray:
    z = (_lg(value) - _lg(p50)) / (1.4826 * np.maximum(mad, _MAD_FLOOR))
    return np.where(np.isnan(p50), 0.0, np.clip(z, -_Z_CLIP, _Z_CLIP))


def _runner(model):
    """model.run (proxy.models.LoadedModel) with the session's input and output looked up once, not per batch."""
    session, feed, output = model.session, model.input_name, [model.output_name]
    column = model.metadata.get("output_column")

    def run(X: np.ndarray) -> np.ndarray:
        out = np.asarray(session.run(output, {feed: X})[0])
        if out.ndim == 2 and out.shape[1] > 1 and column is not None:
            out = out[:, int(column)]
        return out.reshape(len(X), -1)[:, 0].astype(np.float64)
    return run


class AnomalyFlag:
    """One flagged statement, as SHOW ANOMALIES, the log line and the alert sinks show it."""

    __slots__ = ("flagged_at", "completed_at", "score", "cls", "reason", "fingerprint", "query", "database",
                 "username", "application_name", "client_addr", "duration_us", "rows", "sqlstate", "model")

    def __init__(self, **values):
        for name in self.__slots__:
            setattr(self, name, values.get(name))

    @property
    def delay_ms(self) -> float:
        return (self.flagged_at - self.completed_at) * 1000.0

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["class"] = d.pop("cls")
        d["delay_ms"] = round(self.delay_ms, 3)
        d["score"] = round(float(self.score), 4)
        return d


class AnomalyScorer:
    """Scores finished statements in batches; see the module docstring."""

    def __init__(self, cfg, analyzer: Analyzer | None = None, *, with_parameters: bool = False,
                 default_threshold: float = 0.5):
        self.cfg = cfg
        self.analyzer = analyzer if analyzer is not None else Analyzer()
        self.with_parameters = with_parameters      # the query log stores literal values: the learner saw them
        self.default_threshold = default_threshold
        self.interval = cfg.score_interval
        self.max_batch = cfg.max_batch
        self.queue_size = cfg.queue_size
        self.model = None
        self.context = None
        self._run = None
        self.sinks: list = []                        # objects with offer(flag): alert sinks, never blocking
        self.on_template = None                      # callable(fingerprint, normalized, params) on first sight
        self.recent: deque[AnomalyFlag] = deque(maxlen=cfg.recent_flags)
        self._errors = RecentErrors()
        self._static: dict[tuple, StatementRow] = {}
        self._buf: list = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_allowance = cfg.log_max_per_second
        self._log_checked = time.monotonic()
        # counters for /metrics
        self.scored: Counter[str] = Counter()        # by source: model | rules
        self.unscored = 0                            # buffer full, or no model and no rules
        self.failed = 0                              # batches that raised (their statements are unscored)
        self.flags: Counter[str] = Counter()         # by class
        self.log_suppressed = 0
        self.batches = 0
        self.busy_seconds = 0.0
        self.delay_counts = np.zeros(len(DELAY_BUCKETS) + 1, dtype=np.int64)
        self.delay_sum = 0.0
        self.batch_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0

    # ---------------------------------------------------------------- models

    def use_model(self, model) -> None:
        """Serve this anomaly model (None: back to the rules); its serving context comes with it."""
        self.model = model
        self.context = model.context if model is not None else None
        self._run = _runner(model) if model is not None else None
        self._static.clear()

    @property
    def threshold(self) -> float:
        if self.cfg.threshold is not None:
            return self.cfg.threshold
        if self.model is not None and self.model.metadata.get("threshold") is not None:
            return float(self.model.metadata["threshold"])
        return self.default_threshold

    @property
    def source(self) -> str | None:
        if self.model is not None:
            return "model"
        return "rules" if self.cfg.rules_without_model else None

    # ---------------------------------------------------------------- the session's side

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def submit(self, event) -> None:
        """Take a finished statement (O(1)); it is scored within score_interval."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_later(self.interval, self._drain)
        if len(self._buf) < self.queue_size:
            self._buf.append(event)
        else:
            self.unscored += 1

    def flush(self) -> None:
        """Score whatever is buffered now (shutdown)."""
        while self._buf:
            batch, self._buf = self._buf[:self.max_batch], self._buf[self.max_batch:]
            self._score_safely(batch)

    def _drain(self) -> None:
        batch = self._buf
        if len(batch) > self.max_batch:
            batch, self._buf = batch[:self.max_batch], batch[self.max_batch:]
            self._loop.call_soon(self._drain)   # the rest after the clients' callbacks had a turn
        else:
            self._buf = []
            self._scheduled = False
        self._score_safely(batch)

    def _score_safely(self, batch: list) -> None:
        try:
            self.score(batch)
        except Exception:  # scoring must never take the proxy down; the statements stay unscored
            self.failed += 1
            self.unscored += len(batch)
            log.exception("scoring a batch of %d statements failed", len(batch))

    # ---------------------------------------------------------------- scoring

    def rows_for(self, events: list) -> tuple[np.ndarray, list[StatementRow]]:
        """The anomaly feature rows of finished statements, and their fixed parts (stateful: recent errors)."""
        ctx = self.context
        observe = (ctx.recent_errors if ctx is not None else self._errors).observe
        analyze = self.analyzer.analyze
        static = self._static
        parts: list[StatementRow] = []
        facts: list[tuple] = []                   # (duration, rows, bytes, error, recent errors) per statement
        params: list | None = [] if self.with_parameters else None
        for ev in events:
            info = analyze(ev.sql)
            stmts = info.statements
            idx = ev.stmt_index
            if len(stmts) == 1:
                s = stmts[0]
            elif idx is not None and 0 <= idx < len(stmts):
                s = stmts[idx]
            else:
                s = info
            key = (s.fingerprint, s.normalized, ev.application_name or "", ev.client_addr or "")
            part = static.get(key)
            if part is None:
                part = self._static_row(key, s)
            parts.append(part)
            failed = ev.sqlstate is not None
            facts.append((ev.duration_us, ev.rows or 0, ev.bytes_out or 0, failed,
                          observe(part.sender, float(ev.ts or 0.0), failed)))
            if params is not None:
                params.append(self._parameters(ev, info, stmts, idx))
        if not parts:
            return np.zeros((0, len(NAMES)), np.float32), parts
        F = np.array(facts, dtype=np.float64)
        dur, rows, nbytes = F[:, 0], F[:, 1], F[:, 2]
        if not BATCHED:
            return self._exact_rows(events, parts, dur, rows, nbytes, F[:, 4], params), parts
        X = np.stack([p.row for p in parts])
        X[:, _C_VOLUME] = _lg(F[:, :3])
        X[:, _C_ERR] = F[:, 3]
        X[:, _C_RECENT] = F[:, 4]
        if any(p.known for p in parts):
            S = np.array([p.stats for p in parts], dtype=np.float64)
            X[:, _C_Z] = _robust_z(F[:, :3], S[:, _S_P50], S[:, _S_MAD])
            known = (S[:, 0] > 0) & (dur != 0)
            if _C_OVER_P95 is not None:
                X[:, _C_OVER_P95] = np.where(known, np.log10(np.maximum(dur, 1e-3) / np.maximum(S[:, 2], 1.0)), 0.0)
            if _C_EXCESS is not None:
                p50 = S[:, 1]
                X[:, _C_EXCESS] = np.where(known & ~np.isnan(p50), (dur - p50) / 1000.0, np.where(known, dur / 1000.0,
                                                                                                      0.0))
        pfs: list = [None] * len(parts)
        if params is not None:
            for i, values in enumerate(params):
                if values is not None:
                    pf = pfs[i] = param_features(tuple(values))
                    for col, j in _PAR_IN_ROW:
                        X[i, col] = pf[j]
        X[:, _C_EXPECTED] = expectation_columns([p.template for p in parts], dur, rows, nbytes, pfs,
                                                [ev.sqlstate for ev in events])
        return X, parts

    @staticmethod
    def _exact_rows(events, parts, dur, rows, nbytes, recent, params) -> np.ndarray:
        """Rows built one by one by proxy.features (for event features the batch path does not know)."""
        return transform_many([{
            "sql": p.normalized, "parameters": None if params is None or params[i] is None else tuple(params[i]),
            "ts": ev.ts, "duration_us": float(dur[i]), "rows": float(rows[i]), "bytes_out": float(nbytes[i]),
            "sqlstate": ev.sqlstate, "application_name": p.app, "client_addr": ev.client_addr,
            "template": p.template, "app_known": p.app_known, "client_known": p.client_known,
            "client_recent_errors": float(recent[i])} for i, (ev, p) in enumerate(zip(events, parts))], KIND)

    def _static_row(self, key: tuple, s) -> StatementRow:
        fingerprint, normalized, app, client = key
        ctx = self.context
        if ctx is not None:
            part = StatementRow(fingerprint, normalized, ctx.established(fingerprint), app in ctx.apps,
                                client in ctx.clients, app, client)
        else:
            part = StatementRow(fingerprint, normalized, None, False, False, app, client)
        if len(self._static) >= _STATIC_LIMIT:
            self._static.clear()
        self._static[key] = part
        if self.on_template is not None:
            self.on_template(fingerprint, normalized)
        return part

    def _parameters(self, ev, info, stmts, idx) -> list | None:
        """The statement's literal values or bound parameters, as the query log stores them."""
        if ev.parameters is not None:
            return ev.parameters
        if ev.protocol != "simple" or not info.literal_count:
            return None
        values = extract_literals(ev.sql)
        if len(stmts) == 1:
            return values
        i = idx if idx is not None and 0 <= idx < len(stmts) else len(stmts) - 1
        start = sum(x.literal_count for x in stmts[:i])
        return values[start:start + stmts[i].literal_count] or None

    def score(self, events: list) -> np.ndarray | None:
        """Score a batch: set each event's anomaly_score and flag those at or above the threshold."""
        source = self.source
        if not events:
            return None
        if source is None:
            self.unscored += len(events)
            return None
        started = time.perf_counter()
        X, parts = self.rows_for(events)
        model = self.model
        if model is not None:
            scores = self._run(X)
            signals = None
        else:
            signals = self._rule_signals(X)
            scores = signals.max(axis=1)
        threshold = self.threshold
        for ev, s in zip(events, scores.tolist()):
            ev.anomaly_score = s
        flagged = np.nonzero(scores >= threshold)[0]
        if len(flagged):
            if signals is None:
                signals = anomaly_signals(X[flagged])
            else:
                signals = signals[flagged]
            now = time.time()
            for k, i in enumerate(flagged.tolist()):
                self._flag(events[i], parts[i], X[i], float(scores[i]), signals[k], now)
        self.scored[source] += len(events)
        self._account(events, started)
        return scores

    def _rule_signals(self, X: np.ndarray) -> np.ndarray:
        """Rule scores needing no history: the statement treated as known, only injection and error bursts kept."""
        known = X.copy()
        known[:, _C_KNOWN] = 1.0
        signals = anomaly_signals(known)
        kept = np.zeros_like(signals)
        kept[:, _I_BURST] = signals[:, _I_BURST]
        kept[:, _I_INJECTION] = signals[:, _I_INJECTION]
        return kept

    def _account(self, events: list, started: float) -> None:
        finished = time.perf_counter()
        self.busy_seconds += finished - started
        self.batches += 1
        n = len(events)
        self.batch_sum += n
        self.batch_counts[bisect.bisect_left(BATCH_BUCKETS, n)] += 1
        now = time.time()
        delays = now - np.array([ev.ts + ev.duration_us * 1e-6 for ev in events])
        self.delay_sum += float(delays.sum())
        self.delay_counts += np.bincount(np.searchsorted(DELAY_BUCKETS, delays), minlength=len(DELAY_BUCKETS) + 1)

    # ---------------------------------------------------------------- flags

    def _flag(self, ev, part: StatementRow, x: np.ndarray, score: float, signals: np.ndarray, now: float) -> None:
        strongest = int(np.argmax(signals))
        cls = ANOMALY_CLASSES[strongest] if signals[strongest] > 0 else UNUSUAL
        flag = AnomalyFlag(
            flagged_at=now, completed_at=ev.ts + ev.duration_us / 1e6, score=score, cls=cls,
            reason=describe(cls, x, part, ev, self.context), fingerprint=part.fingerprint,
            query=part.normalized[:1000], database=ev.database, username=ev.username,
            application_name=ev.application_name, client_addr=ev.client_addr, duration_us=ev.duration_us,
            rows=ev.rows, sqlstate=ev.sqlstate, model=self.model.sha256[:12] if self.model is not None else "rules")
        self.flags[cls] += 1
        self.recent.append(flag)
        if self.cfg.log_flags:
            self._log(flag)
        for sink in self.sinks:
            sink.offer(flag)

    def _log(self, flag: AnomalyFlag) -> None:
        t = time.monotonic()
        rate = self.cfg.log_max_per_second
        self._log_allowance = min(rate, self._log_allowance + (t - self._log_checked) * rate)
        self._log_checked = t
        if self._log_allowance < 1.0:
            self.log_suppressed += 1
            return
        self._log_allowance -= 1.0
        flag_log.warning("anomaly %s (score %.2f): %s", flag.cls, flag.score, flag.reason, extra={
            "fingerprint": flag.fingerprint, "anomaly_class": flag.cls, "score": round(flag.score, 4),
            "user": flag.username or None, "database": flag.database or None, "addr": flag.client_addr,
            "application_name": flag.application_name or None, "sqlstate": flag.sqlstate})

    def top(self, n: int = 50, cls: str | None = None) -> list[AnomalyFlag]:
        """The most recent flags, newest first (of one class if given)."""
        out = []
        for flag in reversed(self.recent):
            if cls is None or flag.cls == cls:
                out.append(flag)
                if len(out) >= n:
                    break
        return out


# ---------------------------------------------------------------- reasons in words

def _ms(us: float) -> str:
    return f"{us / 1000:.3g} ms"


def _sender(x: np.ndarray, ev) -> str:
    unfamiliar = []
    if x[COL["ev_app_known"]] == 0:
        unfamiliar.append(f"application {ev.application_name or '(none)'!r}")
    if x[COL["ev_client_known"]] == 0:
        unfamiliar.append(f"client {ev.client_addr or '(local)'}")
    return f" from an unfamiliar {' and '.join(unfamiliar)}" if unfamiliar else ""


def describe(cls: str, x: np.ndarray, part: StatementRow, ev, context=None) -> str:
    """Why a statement was flagged, from its feature row and its template's history."""
    t = part.template
    if cls == "slow_outlier" and t is not None:
        p50 = float(t.p50_us or 0.0)
        factor = ev.duration_us / p50 if p50 > 0 else float("inf")
        return (f"took {_ms(ev.duration_us)}, {factor:.0f}x its template's median {_ms(p50)} "
                f"(p95 {_ms(float(t.p95_us or 0.0))})")
    if cls == "unusual_rows" and t is not None:
        return (f"returned {ev.rows or 0:,} rows / {ev.bytes_out or 0:,} bytes where its template's median is "
                f"{float(t.rows_p50 or 0):,.0f} rows / {float(t.bytes_p50 or 0):,.0f} bytes" + _sender(x, ev))
    if cls == "new_template":
        return "a statement outside the learned workload" + (_sender(x, ev) or " (from a familiar sender)")
    if cls == "error_burst":
        window = context.recent_errors.window_s if context is not None else 10.0
        return (f"{int(x[_C_RECENT])} errors from {ev.client_addr or '(local)'}/{ev.application_name or '(none)'} "
                f"in {window:g} s (this one {ev.sqlstate})")
    if cls == "injection":
        return "shaped like an injection: " + ", ".join(injection_signs(x)) + _sender(x, ev)
    return f"isolated from the learned traffic (model score), took {_ms(ev.duration_us)}, {ev.rows or 0} rows"


_SIGNS = (
    ("inj_const_comparisons", "a comparison of constants (tautology)"),
    ("par_tautology", "a tautology inside a value"),
    ("inj_union_nulls", "UNION with NULL columns (column probe)"),
    ("inj_suspicious_funcs", "a probing function (pg_sleep, version(), current_user, file access...)"),
    ("inj_catalog", "a system catalog read"),
    ("inj_union", "UNION"),
    ("inj_comments", "a comment"),
    ("par_sql_meta", "SQL metacharacters inside a value"),
    ("par_quotes", "quotes inside a value"),
)


def injection_signs(x: np.ndarray) -> list[str]:
    """The injection-shaped features present in a row, in words."""
    signs = []
    statements = int(x[COL["inj_statements"]])
    if statements > 1:
        signs.append(f"{statements} stacked statements")
    for name, words in _SIGNS:
        if x[COL[name]] > 0:
            signs.append(words)
    if x[COL["stmt_is_ddl"]] > 0 and x[_C_KNOWN] == 0:
        signs.append("DDL outside the learned workload")
    return signs or ["weak signs only"]
