"""Anomaly scoring of finished statements, off the client's path: small batches every few ms, flags with reasons.

Finished statements arrive as records from the statement feed (proxy/querylog.py StatementFeed): every
anomaly.score_interval the feed takes what the sessions appended, analyses each text once (the analysis the
query log then reuses) and calls `score_records`. Each record is turned into the anomaly model's feature row
as the learner builds it (proxy.features through the champion's ServingContext: template history, familiar
senders, the sender's recent errors), the new rows of a batch are scored in one onnxruntime call, and the
scores go with the batch to the query log. A statement scoring at least the threshold is flagged with the
class of its strongest rule (proxy.features.anomaly_signals; "unusual" when the model alone saw it) and a
reason in words: a pgpilot.anomaly log line (rate-limited), a count by class, an entry in the SHOW ANOMALIES
ring, and an offer to each alert sink (webhook, NOTIFY), which never blocks.

Without a model every statement still gets the learner's rule score, limited to what needs no history
(clear injection shapes and error bursts; a probing function alone is a weak sign), unless
anomaly.rules_without_model is off.

The row's per-statement part (statement shape, template history, sender familiarity) is computed once per
(statement analysis, session) with proxy.features.transform_one; only the event's own values (time, rows,
bytes, error, the sender's recent errors, parameters) are filled in per batch, with the same arithmetic as
proxy.features (tests/models/test_rows.py checks both give the same rows). Scores are memoized by that part
and the event's values bucketed to under 1 % (not with parameters), so a steady workload rarely calls the
model at all. A steady batch (no errors, no parameters) is collected column by column in C loops (map,
list.count) rather than record by record; when all its records share one (statement, session), as under a
benchmark or a single busy application, that is looked up once. A memo key is one int (the group number of
(fixed part, SQLSTATE, recent errors) and the three buckets), computed for the batch with numpy (for a batch of a
few records, by bisecting a table of the buckets' first whole numbers: the same buckets). The few rows a
batch needs (memo misses, new flags) are built one by one with proxy.features' own arithmetic, which costs less
than the column-wise path at that size. A flagged key keeps the row and rule signals its class and reason come
from, so a flag repeated within its key's bucket costs no feature row; the reason is put in words only when read.

Inline lane. Where the feed serves only the scorer (no query log, no parameters), a statement whose score the memo
already knows needs no record at all. After each batch the scorer gives every steady (statement, session, bytes
sent, rows) it scored below the threshold a lane: the widest run of consecutive duration buckets around it whose
memoized scores are all below the threshold, as whole microseconds [shortest, longest], in the session's
SessionInfo (lane_q by the simple Query's shape, lane_x by the extended protocol's text). A session whose finished
statement succeeded, whose sender has had no failed statement within the error window, and whose duration, bytes and
rows fall in a lane counts it (lane_hits) and appends nothing: the statement's score is one of those memoized below
the threshold, as the batch would have found it. Everything else becomes a record as before. A new model or context,
and an emptied memo, close every lane. Flags never come from a lane: it only holds scores below the threshold.
When a lane is met again by a statement beyond a gap (buckets no statement has fallen in yet), the scorer fills the
gap: it scores the buckets within half a log unit of the lane's ends at both ends of each bucket, in one model call,
and the lane may grow over a filled bucket whose higher score of the two is below the threshold. Fills serve the
lanes only; the memo still holds the scores of statements.
"""
from __future__ import annotations

import bisect
import logging
import math
import operator
import time
from collections import Counter, deque

import numpy as np

from proxy.analysis import Analyzer, extract_literals
from proxy.querylog import (R_BYTES, R_DURATION, R_PARAMS, R_ROWS, R_SESSION, R_SQL, R_SQLSTATE, R_STMT, R_TS,
                            StatementFeed, bind_values, event_record, statement_of)
from proxy.features import (ANOMALY_CLASSES, EVENT_FEATURES, FEATURE_NAMES, PARAM_FEATURES, RecentErrors,
                            anomaly_signals, event_vector, expectation_columns, param_features, transform_many,
                            transform_one)

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
_C_PROBE = COL["inj_suspicious_funcs"]
_PROBE_WEIGHT = 0.3                     # a probing function alone, scored by rules: a weak sign, not a flag
# The event features the batch path computes itself; any other (a newer proxy.features) makes the scorer build
# each row with proxy.features.transform_one instead: slower, never different.
_BATCHED_EVENT_FEATURES = frozenset({
    "ev_duration_log", "ev_rows_log", "ev_bytes_log", "ev_error", "ev_z_duration", "ev_z_rows", "ev_z_bytes",
    "ev_new_template", "ev_app_known", "ev_client_known", "ev_app_template_share", "ev_client_recent_errors",
    "ev_over_p95_log10", "ev_excess_ms", "ev_expected_log", "ev_expected_mad_log", "ev_z_expected",
    "ev_excess_expected_ms", "ev_error_probe"})
BATCHED = set(EVENT_FEATURES) <= _BATCHED_EVENT_FEATURES
_N_EVENT = len(EVENT_FEATURES)
assert NAMES[:_N_EVENT] == EVENT_FEATURES       # a row starts with its event features
_FEW_ROWS = 8               # rows built one by one (proxy.features.event_vector) up to this many, else column-wise
_I_BURST, _I_INJECTION = ANOMALY_CLASSES.index("error_burst"), ANOMALY_CLASSES.index("injection")
assert set(EVENT_FEATURES) <= set(NAMES)
# The same constants as proxy.features' robust z-score.
_MAD_FLOOR = 0.25
_Z_CLIP = 50.0
_STATIC_LIMIT = 50_000
_MEMO_STEPS = 128.0         # memo buckets per log unit of duration, rows and bytes (under 1 % wide)
_MEMO_LIMIT = 200_000
# A memo key is one int: the key's group (fixed part, SQLSTATE, recent errors) numbered in _groups, then the
# duration, rows and bytes buckets, 13 bits each (a bucket of 2**63 is 5,600: they never reach the cap).
_Q_BITS = 13
_Q_MAX = (1 << _Q_BITS) - 1
_GROUP_SHIFT = 3 * _Q_BITS
_DUR_SHIFT = 2 * _Q_BITS
_RESEED_BATCHES = 25        # after lanes close, batches whose memo hits open lanes too (the memo may have kept them)
_LANE_LIMIT = 50_000        # lanes (session, text, bytes, rows) kept before all are closed and opened anew
_FILL_BUCKETS = 64          # buckets scored beyond each end of a lane that meets a new bucket (half a log unit)
_G_TS, _G_DUR, _G_ROWS, _G_BYTES, _G_STATE, _G_STMT, _G_SESSION = (
    operator.itemgetter(i) for i in (R_TS, R_DURATION, R_ROWS, R_BYTES, R_SQLSTATE, R_STMT, R_SESSION))
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DELAY_EDGES = np.array(DELAY_BUCKETS)
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


def _buckets(values: np.ndarray) -> np.ndarray:
    """The memo bucket of each value (duration, rows or bytes): 1/_MEMO_STEPS of a log unit, under 1 % wide."""
    return np.minimum(np.floor(np.log1p(np.maximum(values, 0.0)) * _MEMO_STEPS), _Q_MAX).astype(np.int64)


def _bucket_table(n: int) -> tuple[list[int], list[int]]:
    """For buckets 0..n: the first whole duration (us) in each (or after it, for an empty bucket), and the bucket of
    that duration; from the memo's own bucketing, so each bucket's durations are exactly its memo keys'."""
    q = np.arange(n + 2, dtype=np.float64)
    near = np.maximum(np.floor(np.expm1(q / _MEMO_STEPS))[:, None] + np.arange(-2.0, 3.0), 0.0)
    at_or_after = _buckets(near.ravel()).reshape(near.shape) >= q[:, None]   # ascending in each row
    first = near[np.arange(len(q)), at_or_after.argmax(axis=1)]
    return first.astype(np.int64).tolist(), _buckets(first).tolist()


# Durations up to 10^12 us; beyond, spans are computed one at a time.
_TABLE_BUCKETS = int(math.log1p(1e12) * _MEMO_STEPS)
_FIRST_US, _BUCKET_OF_FIRST = _bucket_table(_TABLE_BUCKETS)
_TABLE_END = _FIRST_US[_TABLE_BUCKETS]      # whole numbers below this are bucketed by bisecting _FIRST_US


def bucket_span(q: int) -> tuple[int, int] | None:
    """The shortest and longest whole duration (us) in memo bucket q, or None if no whole number falls in it."""
    if q < _TABLE_BUCKETS:
        lo, after = _FIRST_US[q], _FIRST_US[q + 1]
        return (lo, after - 1) if after > lo else None
    lo, hi = math.expm1(q / _MEMO_STEPS), math.expm1((q + 1) / _MEMO_STEPS)
    near = np.array([max(int(v) + k, 0) for v in (lo, hi) for k in range(-2, 3)], dtype=np.float64)
    inside = near[_buckets(near) == q]
    return (int(inside.min()), int(inside.max())) if len(inside) else None


def _next_bucket(q: int) -> int:
    """The bucket of the next whole duration after (non-empty) bucket q."""
    if q < _TABLE_BUCKETS:
        return _BUCKET_OF_FIRST[q + 1]
    return int(_buckets(np.array([bucket_span(q)[1] + 1.0]))[0])


def _previous_bucket(q: int) -> int | None:
    """The bucket of the whole duration before (non-empty) bucket q; None below 0 us."""
    lo = bucket_span(q)[0]
    if lo == 0:
        return None
    if q < _TABLE_BUCKETS:
        p = q - 1
        while _FIRST_US[p + 1] <= _FIRST_US[p]:     # bucket p is empty
            p -= 1
        return p
    return int(_buckets(np.array([lo - 1.0]))[0])


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


def _text(sql) -> str:
    return sql if type(sql) is str else sql.decode("utf-8", "replace")


class _Facts:
    """A batch's records as the rows need them: parallel lists over the records that have an analysis."""

    __slots__ = ("parts", "index", "ts", "dur", "nrows", "nbytes", "failed", "recent", "params", "group")

    def __init__(self):
        self.parts: list[StatementRow] = []
        self.index: list[int] | range = []   # position of each among the batch's records
        self.ts: list = []
        self.dur: list = []
        self.nrows: list = []
        self.nbytes: list = []
        self.failed: list[bool] = []
        self.recent: list[int] = []
        self.params: list | None = None
        self.group = None                    # memo group number of every record (an int: one for all), if known


class FlaggedStatement:
    """A flagged record with the names describe() and AnomalyFlag read (built for flags only)."""

    __slots__ = ("ts", "duration_us", "rows", "bytes_out", "sqlstate", "database", "username", "application_name",
                 "client_addr")

    def __init__(self, rec: tuple):
        who = rec[R_SESSION]
        self.ts, self.duration_us, self.rows, self.bytes_out = rec[R_TS], rec[R_DURATION], rec[R_ROWS], rec[R_BYTES]
        self.sqlstate = rec[R_SQLSTATE]
        self.database, self.username = who.database, who.username
        self.application_name, self.client_addr = who.application_name, who.client_addr


class AnomalyFlag:
    """One flagged statement, as SHOW ANOMALIES, the log line and the alert sinks show it.

    The reason is put in words when first read (from `why`: describe()'s arguments): a busy proxy flags more
    statements than it logs, and most flags are never shown one by one."""

    FIELDS = ("flagged_at", "completed_at", "score", "cls", "reason", "fingerprint", "query", "database",
              "username", "application_name", "client_addr", "duration_us", "rows", "sqlstate", "model")
    __slots__ = tuple(name for name in FIELDS if name != "reason") + ("_reason", "_why")

    def __init__(self, *, reason: str | None = None, why: tuple | None = None, **values):
        for name in self.__slots__[:-2]:
            setattr(self, name, values.get(name))
        self._reason = reason
        self._why = why

    @property
    def reason(self) -> str | None:
        if self._reason is None and self._why is not None:
            self._reason = describe(*self._why)
            self._why = None
        return self._reason

    @property
    def delay_ms(self) -> float:
        return (self.flagged_at - self.completed_at) * 1000.0

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.FIELDS}
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
        self._by_record: dict[tuple, StatementRow] = {}   # (analysis, statement index, session) -> its fixed part
        self._memo: dict[int, float] = {}            # memo key (group, buckets: see _memo_keys) -> score
        self._groups: dict[tuple, int] = {}          # (fixed part, SQLSTATE, recent errors) -> its group number
        self._steady: dict[StatementRow, int] = {}   # fixed part -> the group number of (part, None, 0)
        self._flag_rows: dict[int, tuple] = {}       # flagged memo key -> (its feature row, its rule signals)
        self.feed: StatementFeed | None = None       # where finished statements come from (ServedModels sets it)
        # The inline lane (see "Inline lane" in the module docstring): on where the feed serves only the scorer.
        self.inline = False
        self.lane_hits = 0                           # statements the sessions counted in a lane, not yet settled
        self._lanes: dict[tuple, tuple] = {}         # (session, simple, text, bytes, rows) -> (memo key base, buckets)
        self._laned: set = set()                     # SessionInfos whose lane_q / lane_x hold ranges
        self._filled: dict[int, float] = {}          # memo key -> the higher score of its bucket's two ends
        self._reseed = 0                             # batches whose every memo key may open a lane (not only new)
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
        self.scored_inline = 0                       # of `scored`, statements counted in a lane by their session

    # ---------------------------------------------------------------- models

    def use_model(self, model) -> None:
        """Serve this anomaly model (None: back to the rules); its serving context comes with it."""
        self.settle()
        self.model = model
        self.context = model.context if model is not None else None
        self._run = _runner(model) if model is not None else None
        self._static.clear()
        self._by_record.clear()
        self._forget_groups()

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

    # ---------------------------------------------------------------- the feed's side

    def start(self) -> None:
        """Score the feed's batches without a query log (with one, the query log's feed calls score_records)."""
        if self.feed is None:
            self.feed = StatementFeed(self.analyzer, self.interval)
            self.feed.scorer = self
        self.feed.start()

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.tick()
            if self.feed.query_log is None:
                self.feed.stop()

    def submit(self, event) -> None:
        """Take a finished statement as an event object (O(1)); it is scored within score_interval."""
        self.feed.records.append(event_record(event))

    def flush(self) -> None:
        """Score whatever is waiting now."""
        if self.feed is not None:
            self.feed.tick()

    def score_records(self, records: list[tuple], infos: list) -> list | None:
        """Scores of a batch of records (None where unscored); flags those at or above the threshold."""
        if self.source is None:
            self.unscored += len(records)
            return None
        if len(records) > self.queue_size:
            self.unscored += len(records) - self.queue_size
            records, infos = records[:self.queue_size], infos[:self.queue_size]
        # One pass over the whole batch: its fixed costs (some 40 numpy calls) are paid once per take of the feed;
        # only the model's input is cut into max_batch rows (_model_scores).
        try:
            scores = self._score(records, infos)
        except Exception:  # scoring must never take the proxy down; the statements stay unscored
            self.failed += 1
            self.unscored += len(records)
            log.exception("scoring a batch of %d statements failed", len(records))
            scores = None
        return scores if scores is not None else [None] * len(records)

    def score(self, events: list) -> np.ndarray | None:
        """Score event objects: set each one's anomaly_score and flag those at or above the threshold."""
        if not events:
            return None
        records = [event_record(ev) for ev in events]
        scores = self._score(records, [self.analyzer.analyze(_text(r[R_SQL])) for r in records])
        if scores is None:
            if self.source is None:
                self.unscored += len(events)
            return None
        for ev, score in zip(events, scores):
            ev.anomaly_score = score
        return np.array([np.nan if v is None else v for v in scores])

    # ---------------------------------------------------------------- scoring

    def rows_for(self, events: list) -> tuple[np.ndarray, list[StatementRow]]:
        """The anomaly feature rows of finished statements (event objects), and their fixed parts (stateful:
        recent errors)."""
        records = [event_record(ev) for ev in events]
        facts = self._collect(records, [self.analyzer.analyze(_text(r[R_SQL])) for r in records])
        return self._matrix(records, facts), facts.parts

    def _collect(self, records: list[tuple], infos: list) -> "_Facts":
        """What the rows need of each record that has an analysis (stateful: recent errors)."""
        errors = self.context.recent_errors if self.context is not None else self._errors
        if not errors and not self.with_parameters and None not in infos:
            f = self._collect_columns(records, infos)
            if f is not None:
                return f
        observe = errors.observe
        static = self._static
        f = _Facts()
        parts, index, ts, dur, nrows, nbytes, failed, recent = (f.parts, f.index, f.ts, f.dur, f.nrows, f.nbytes,
                                                                f.failed, f.recent)
        params = f.params = [] if self.with_parameters else None
        watch_errors = bool(errors)               # some sender has errors in its window
        for i, (rec, info) in enumerate(zip(records, infos)):
            if info is None:
                continue
            idx = rec[R_STMT]
            s = statement_of(info, idx)
            who = rec[R_SESSION]
            part = static.get((s, who))
            if part is None:
                part = self._static_row(s, who)
            index.append(i)
            parts.append(part)
            t = rec[R_TS]
            ts.append(t)
            dur.append(rec[R_DURATION])
            nrows.append(rec[R_ROWS] or 0)
            nbytes.append(rec[R_BYTES] or 0)
            err = rec[R_SQLSTATE] is not None
            failed.append(err)
            if err or watch_errors:
                recent.append(observe(part.sender, float(t or 0.0), err))
                watch_errors = True
            else:
                recent.append(0)
            if params is not None:
                params.append(self._parameters(rec, info, idx))
        return f

    def _collect_columns(self, records: list[tuple], infos: list) -> "_Facts | None":
        """_collect for a batch without errors, parameters or unanalysed texts (the steady state): column by column,
        in C loops (map, list.count), with the fixed parts found by (analysis, statement index, session), once for
        the whole batch when every record shares them (one template from one kind of sender: one memo group);
        None when the batch has an error (then the sender's recent errors must be counted record by record)."""
        n = len(records)
        if list(map(_G_STATE, records)).count(None) != n:
            return None
        stmts = list(map(_G_STMT, records))
        sessions = list(map(_G_SESSION, records))
        info, idx, who = infos[0], stmts[0], sessions[0]
        f = _Facts()
        if infos.count(info) == n and stmts.count(idx) == n and sessions.count(who) == n:
            part = self._part((info, idx, who))
            parts = [part] * n
            f.group = self._steady.get(part)
            if f.group is None:
                f.group = self._group_of(part, None, 0)
        else:
            by_record = self._by_record
            keys = list(zip(infos, stmts, sessions))
            parts = list(map(by_record.get, keys))
            if None in parts:
                for k, part in enumerate(parts):
                    if part is None:
                        parts[k] = self._part(keys[k])
        f.parts, f.index, f.ts, f.dur = parts, range(n), list(map(_G_TS, records)), list(map(_G_DUR, records))
        nrows, nbytes = list(map(_G_ROWS, records)), list(map(_G_BYTES, records))
        f.nrows = [v or 0 for v in nrows] if None in nrows else nrows
        f.nbytes = [v or 0 for v in nbytes] if None in nbytes else nbytes
        f.failed, f.recent = [False] * n, [0] * n
        return f

    def _part(self, key: tuple) -> StatementRow:
        """The fixed part of an (analysis, statement index, session): remembered, or made and remembered."""
        part = self._by_record.get(key)
        if part is None:
            info, idx, who = key
            s = statement_of(info, idx)
            part = self._static.get((s, who))
            if part is None:
                part = self._static_row(s, who)
            self._by_record[key] = part
        return part

    def _group_of(self, part: StatementRow, sqlstate, recent: int) -> int:
        """The memo group number of (fixed part, SQLSTATE, recent errors), numbered on first sight."""
        key = (part, sqlstate, recent)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = len(self._groups)
            if sqlstate is None and not recent:
                self._steady[part] = group
        return group

    def _forget_groups(self) -> None:
        """Empty the memo with its group numbers (and what is keyed by them: the lanes too)."""
        self._groups.clear()
        self._steady.clear()
        self._memo.clear()
        self._flag_rows.clear()
        self._filled.clear()
        self._close_lanes()

    # ---------------------------------------------------------------- the inline lane

    @property
    def lane_window(self) -> float:
        """Seconds after a sender's failed statement during which its statements must be counted with their
        recent errors (the error window, plus a second for the two clocks involved)."""
        errors = self.context.recent_errors if self.context is not None else self._errors
        return errors.window_s + 1.0

    def settle(self) -> None:
        """Count the statements the sessions scored in their lanes (readers of the counters call this first)."""
        n = self.lane_hits
        if n:
            self.lane_hits = 0
            self.scored[self.source or "rules"] += n
            self.scored_inline += n
            self.delay_counts[0] += n      # scored at completion

    def _close_lanes(self) -> None:
        """Empty every lane: their ranges were scored by a model, context or memo no longer in use."""
        self.settle()
        for who in self._laned:
            who.lane_q.clear()
            who.lane_x.clear()
        self._laned.clear()
        self._lanes.clear()
        self._reseed = _RESEED_BATCHES

    def _open_lanes(self, records: list[tuple], infos: list, f: "_Facts", keys: list[int], values: list,
                    threshold: float, fresh: dict | None) -> None:
        """Open or widen the lanes of what this batch scored steady (no error, none recent, one statement, below
        the threshold): per (session, text, bytes, rows), the run of consecutive duration buckets around its lane
        (or, for a new one, the batch's middle bucket) whose memoized scores, for that fixed part, rows and bytes,
        are all below the threshold.

        Only the batch's new memo keys (`fresh`: key -> a record of it) can open or widen a lane: a bucket the memo
        already held was there when the lanes last grew. After lanes are closed with the memo kept, every key counts
        for a while (None)."""
        lanes, feed = self._lanes, self.feed
        if len(lanes) >= _LANE_LIMIT:
            self._close_lanes()
        failed, recent, index = f.failed, f.recent, f.index
        if fresh is None:
            self._reseed = max(0, self._reseed - 1)
            fresh = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))
        # each steady memo key -> one record of it
        first = {key: k for key, k in fresh.items() if values[k] < threshold and not failed[k] and not recent[k]}
        keys_of: dict[tuple, list[int]] = {}      # lane -> the batch's steady memo keys of it
        for key, k in first.items():
            i = index[k]
            info = infos[i]
            rec = records[i]
            sql = rec[R_SQL]
            if info.single is None or type(sql) is not bytes:
                continue
            simple = rec[R_STMT] != -1
            if simple:
                # Keyed by shape, where the feed gives every text of that shape this same analysis.
                text = feed.shape_key(sql, info) if feed is not None else None
                if text is None:
                    continue
            else:
                text = sql
            keys_of.setdefault((rec[R_SESSION], simple, text, rec[R_BYTES], rec[R_ROWS]), []).append(key)
        filling: list[tuple] = []
        for at, lane_keys in keys_of.items():
            base = lane_keys[0] & ~(_Q_MAX << _DUR_SHIFT)     # the same fixed part, rows and bytes: one base
            known = lanes.get(at)
            again = known is not None and known[0] == base
            if again:
                qlo, qhi = known[1], known[2]
            else:
                # seeded at the batch's middle duration bucket for it (a duration's: not empty), then grown
                buckets = sorted((key >> _DUR_SHIFT) & _Q_MAX for key in lane_keys)
                qlo = qhi = buckets[len(buckets) // 2]
            qlo, qhi = self._widen(base, qlo, qhi, threshold)
            if again and any(not qlo <= (key >> _DUR_SHIFT) & _Q_MAX <= qhi for key in lane_keys):
                # A lane met again beyond a gap: score the buckets around it (below).
                filling.append((at, base, qlo, qhi, first[lane_keys[0]]))
                continue
            self._set_lane(at, known, base, qlo, qhi)
        if filling:
            self._fill(records, f, filling)
            for at, base, qlo, qhi, _ in filling:
                qlo, qhi = self._widen(base, qlo, qhi, threshold)
                self._set_lane(at, lanes.get(at), base, qlo, qhi)

    def _set_lane(self, at: tuple, known: tuple | None, base: int, qlo: int, qhi: int) -> None:
        """Give lane `at` buckets [qlo, qhi] (in microseconds, in its sender's lane_q or lane_x)."""
        if known == (base, qlo, qhi):
            return
        self._lanes[at] = (base, qlo, qhi)
        who, simple, text, nbytes, nrows = at
        (who.lane_q if simple else who.lane_x).setdefault(text, {})[nbytes] = (
            bucket_span(qlo)[0], bucket_span(qhi)[1], nrows)
        self._laned.add(who)

    def _fill(self, records: list[tuple], f: "_Facts", filling: list[tuple]) -> None:
        """Score the buckets within _FILL_BUCKETS of each lane's ends that neither the memo nor an earlier fill
        holds, at both of each bucket's ends (its shortest and longest whole duration), in one model call, and keep
        the higher score of the two per bucket for the lanes (_filled). The memo is not touched: a statement's own
        score still comes from the first statement of its bucket.

        A lane grows only through buckets the memo or a fill holds; without a fill, a new bucket beyond a gap (a
        bucket no statement has fallen in yet) starts no growth, and the statements beyond it keep becoming
        records, each batch calling the model for its new buckets. A fill closes such gaps near a lane that is met
        again, so that a steady workload's lanes soon cover its durations."""
        memo, filled = self._memo, self._filled
        if len(filled) >= _MEMO_LIMIT:
            filled.clear()       # the lanes already made stay: their ranges were scored by the model in use
        keys: list[int] = []
        ends: list[int] = []
        source: list[int] = []
        for _, base, qlo, qhi, k in filling:
            todo = []
            q = qhi
            for _ in range(_FILL_BUCKETS):
                if q >= _Q_MAX:
                    break
                q = _next_bucket(q)
                todo.append(q)
            q = qlo
            for _ in range(_FILL_BUCKETS):
                q = _previous_bucket(q)
                if q is None:
                    break
                todo.append(q)
            for q in todo:
                key = base | (q << _DUR_SHIFT)
                if key in memo or key in filled:
                    continue
                span = bucket_span(q)
                if span is None:
                    continue
                keys.append(key)
                ends += span
                source += (k, k)
        if not keys:
            return
        g = _Facts()
        g.parts = [f.parts[k] for k in source]
        g.index = range(len(source))
        g.dur = ends
        g.nrows = [f.nrows[k] for k in source]
        g.nbytes = [f.nbytes[k] for k in source]
        g.failed = [False] * len(source)
        g.recent = [0] * len(source)
        scores = self._model_scores(self._matrix([records[f.index[k]] for k in source], g)).tolist()
        for n, key in enumerate(keys):
            a, b = scores[2 * n], scores[2 * n + 1]
            filled[key] = max(a, b) if a == a and b == b else math.nan     # NaN: never below the threshold

    def _widen(self, base: int, qlo: int, qhi: int, threshold: float) -> tuple[int, int]:
        """Buckets [qlo, qhi] grown by each neighbouring bucket the memo (or a fill) holds a score below the
        threshold for."""
        memo, filled = self._memo, self._filled

        def below(q: int) -> bool:
            key = base | (q << _DUR_SHIFT)
            v = memo.get(key)
            if v is None:
                v = filled.get(key)
            return v is not None and v < threshold       # NaN is not below

        while qhi < _Q_MAX:
            q = _next_bucket(qhi)
            if not below(q):
                break
            qhi = q
        while True:
            q = _previous_bucket(qlo)
            if q is None or not below(q):
                break
            qlo = q
        return qlo, qhi

    def _memo_keys(self, records: list[tuple], f: "_Facts") -> tuple[list[int], list | np.ndarray]:
        """Each collected record's memo key: its group (fixed part, SQLSTATE, recent errors) and its duration,
        rows and bytes, each bucketed to 1/_MEMO_STEPS of a log unit, packed in one int; and the durations.

        A few records of whole numbers (the steady state with the inline lane: a batch is the statements outside
        every lane) are bucketed by bisecting the bucket table, which gives a whole number the bucket numpy gives
        it, without numpy's fixed cost per call."""
        n = len(f.parts)
        values = f.dur + f.nrows + f.nbytes
        if n <= _FEW_ROWS and all(type(v) is int and 0 <= v < _TABLE_END for v in values):
            first = _FIRST_US
            q = [bisect.bisect_right(first, v) - 1 for v in values]
            codes = [(q[i] << _DUR_SHIFT) | (q[n + i] << _Q_BITS) | q[2 * n + i] for i in range(n)]
            group = f.group
            if group is None:
                group_list = self._group_numbers(records, f)
                return [c | (g << _GROUP_SHIFT) for c, g in zip(codes, group_list)], f.dur
            shifted = group << _GROUP_SHIFT
            return [c | shifted for c in codes], f.dur
        F = np.array(values, dtype=np.float64).reshape(3, n)
        Q = _buckets(F)
        code = (Q[0] << (2 * _Q_BITS)) | (Q[1] << _Q_BITS) | Q[2]
        group = f.group
        if group is None:
            group = np.array(self._group_numbers(records, f), dtype=np.int64)
        return (code | (group << _GROUP_SHIFT)).tolist(), F[0]

    def _group_numbers(self, records: list[tuple], f: "_Facts") -> list[int]:
        """Each collected record's memo group number (numbered on first sight)."""
        steady = self._steady
        if not any(f.failed) and not any(f.recent):
            groups = list(map(steady.get, f.parts))
            if None in groups:
                groups = [self._group_of(p, None, 0) if g is None else g for p, g in zip(f.parts, groups)]
            return groups
        keys = list(zip(f.parts, [records[i][R_SQLSTATE] for i in f.index], f.recent))
        groups = list(map(self._groups.get, keys))
        if None in groups:
            groups = [self._group_of(*key) if g is None else g for key, g in zip(keys, groups)]
        return groups

    def _matrix(self, records: list[tuple], f: "_Facts", rows: list[int] | None = None) -> np.ndarray:
        """The feature rows of the collected records (of positions `rows` among them, if given)."""
        parts = f.parts
        take = (lambda values: values) if rows is None else (lambda values: [values[k] for k in rows])
        parts = take(parts)
        if not parts:
            return np.zeros((0, len(NAMES)), np.float32)
        F = np.array((take(f.dur), take(f.nrows), take(f.nbytes)), dtype=np.float64).T
        params = take(f.params) if f.params is not None else None
        if not BATCHED:
            return self._exact_rows(records, take(f.index), parts, F[:, 0], F[:, 1], F[:, 2], take(f.recent), params)
        if len(parts) <= _FEW_ROWS:
            return self._few_rows(records, take(f.index), parts, F, take(f.recent), params)
        X = np.stack([p.row for p in parts])
        X[:, _C_VOLUME] = _lg(F)
        X[:, _C_ERR] = take(f.failed)
        X[:, _C_RECENT] = take(f.recent)
        if any(p.known for p in parts):
            S = np.array([p.stats for p in parts], dtype=np.float64)
            d = F[:, 0]
            X[:, _C_Z] = _robust_z(F, S[:, _S_P50], S[:, _S_MAD])
            known = (S[:, 0] > 0) & (d != 0)
            if _C_OVER_P95 is not None:
                X[:, _C_OVER_P95] = np.where(known, np.log10(np.maximum(d, 1e-3) / np.maximum(S[:, 2], 1.0)), 0.0)
            if _C_EXCESS is not None:
                p50 = S[:, 1]
                X[:, _C_EXCESS] = np.where(known & ~np.isnan(p50), (d - p50) / 1000.0, np.where(known, d / 1000.0,
                                                                                                0.0))
        pfs: list = [None] * len(parts)
        if params is not None:
            for i, values in enumerate(params):
                if values is not None:
                    pf = pfs[i] = param_features(tuple(values))
                    for col, j in _PAR_IN_ROW:
                        X[i, col] = pf[j]
        X[:, _C_EXPECTED] = expectation_columns([p.template for p in parts], F[:, 0], F[:, 1], F[:, 2], pfs,
                                                [records[i][R_SQLSTATE] for i in take(f.index)])
        return X

    @staticmethod
    def _few_rows(records, index, parts, F, recent, params) -> np.ndarray:
        """The rows of a few records (a batch's memo misses, its new flags) with proxy.features' own per-event
        arithmetic: the same values as the column-wise path, without its fixed cost of some 40 numpy calls."""
        X = np.array([p.row for p in parts])
        for k, p in enumerate(parts):
            pf = None
            if params is not None and params[k] is not None:
                pf = param_features(tuple(params[k]))
                for col, j in _PAR_IN_ROW:
                    X[k, col] = pf[j]
            dur, rows, nbytes = F[k].tolist()
            X[k, :_N_EVENT] = event_vector({
                "duration_us": dur, "rows": rows, "bytes_out": nbytes, "sqlstate": records[index[k]][R_SQLSTATE],
                "application_name": p.app, "app_known": p.app_known, "client_known": p.client_known,
                "client_recent_errors": float(recent[k])}, p.template, pf)
        return X

    @staticmethod
    def _exact_rows(records, index, parts, dur, rows, nbytes, recent, params) -> np.ndarray:
        """Rows built one by one by proxy.features (for event features the batch path does not know)."""
        out = []
        for k, (i, p) in enumerate(zip(index, parts)):
            rec = records[i]
            who = rec[R_SESSION]
            out.append({
                "sql": p.normalized, "parameters": None if params is None or params[k] is None else tuple(params[k]),
                "ts": rec[R_TS], "duration_us": float(dur[k]), "rows": float(rows[k]), "bytes_out": float(nbytes[k]),
                "sqlstate": rec[R_SQLSTATE], "application_name": p.app, "client_addr": who.client_addr,
                "template": p.template, "app_known": p.app_known, "client_known": p.client_known,
                "client_recent_errors": float(recent[k])})
        return transform_many(out, KIND)

    def _static_row(self, s, who) -> StatementRow:
        fingerprint, normalized = s.fingerprint, s.normalized
        app, client = who.application_name or "", who.client_addr or ""
        ctx = self.context
        if ctx is not None:
            part = StatementRow(fingerprint, normalized, ctx.established(fingerprint), app in ctx.apps,
                                client in ctx.clients, app, client)
        else:
            part = StatementRow(fingerprint, normalized, None, False, False, app, client)
        if len(self._static) >= _STATIC_LIMIT:
            self._static.clear()
            self._by_record.clear()
            self._forget_groups()
        self._static[s, who] = part
        if self.on_template is not None:
            self.on_template(fingerprint, normalized)
        return part

    def _parameters(self, rec: tuple, info, idx) -> list | None:
        """The statement's literal values or bound parameters, as the query log stores them."""
        params = rec[R_PARAMS]
        if params is not None:
            return bind_values(params) if type(params) is bytes else params
        if idx == -1 or not info.literal_count:
            return None
        values = extract_literals(_text(rec[R_SQL]))
        stmts = info.statements
        if len(stmts) == 1:
            return values
        i = idx if idx is not None and 0 <= idx < len(stmts) else len(stmts) - 1
        start = sum(x.literal_count for x in stmts[:i])
        return values[start:start + stmts[i].literal_count] or None

    def _score(self, records: list[tuple], infos: list) -> list | None:
        """Scores of the records (None for those without an analysis), flags; None when nothing scores.

        A statement whose fixed part, SQLSTATE, recent errors and duration, rows and bytes (each within 1/128 of a
        log unit, under 1%) equal an earlier one's gets that one's score without a model call (the memo, not
        used with parameters, which every row has its own of). A flagged statement's class and reason come from the
        row of the first flagged statement of its memo key (its own row without the memo)."""
        source = self.source
        if source is None or not records:
            return None
        started = time.thread_time()      # CPU time: on a loaded machine wall time counts preemption
        if len(self._groups) >= _MEMO_LIMIT:
            self._forget_groups()         # here, not while a batch's records are given group numbers
        f = self._collect(records, infos)
        parts = f.parts
        if not parts:
            return [None] * len(records)
        n = len(parts)
        memo = self._memo if f.params is None else None
        if memo is not None:
            keys, durations = self._memo_keys(records, f)
            got = list(map(memo.get, keys))
            if None in got:
                todo = [k for k in range(n) if got[k] is None]
                fresh: dict = {}
                for k in todo:
                    fresh.setdefault(keys[k], k)
                rows = list(fresh.values())
                values = self._model_scores(self._matrix(records, f, rows)).tolist()
                if len(memo) + len(values) > _MEMO_LIMIT:
                    memo.clear()
                    self._close_lanes()       # a lane only holds scores the memo holds
                for key, v in zip(fresh, values):
                    memo[key] = v
                for k in todo:
                    got[k] = memo[keys[k]]
            else:
                fresh = None
            values = got
            if self.inline and (fresh or self._reseed):
                self._open_lanes(records, infos, f, keys, values, self.threshold, None if self._reseed else fresh)
        else:
            values = self._model_scores(self._matrix(records, f)).tolist()
            durations = f.dur
        threshold = self.threshold
        top = max(values)       # NaN only when the first score is NaN (then look at each)
        flagged = [k for k, v in enumerate(values) if v >= threshold] if top >= threshold or top != top else None
        if flagged:
            now = time.time()
            if memo is not None:
                # Flagged memo keys keep the row and rule signals their class and reason come from, as their score.
                why = self._flag_rows
                new_keys: dict = {}
                for i in flagged:
                    if keys[i] not in why:
                        new_keys.setdefault(keys[i], i)
                if new_keys:
                    X = self._matrix(records, f, list(new_keys.values()))
                    signals = self._signals(X)
                    if len(why) + len(new_keys) > _MEMO_LIMIT:
                        why.clear()
                    for k, key in enumerate(new_keys):
                        why[key] = (X[k], signals[k])
                for i in flagged:
                    x, signals_i = why[keys[i]]
                    self._flag(records[f.index[i]], parts[i], x, values[i], signals_i, now)
            else:
                X = self._matrix(records, f, flagged)
                signals = self._signals(X)
                for k, i in enumerate(flagged):
                    self._flag(records[f.index[i]], parts[i], X[k], values[i], signals[k], now)
        self.scored[source] += n
        self._account(f.ts, durations, started)
        if n == len(records):
            return values
        out: list = [None] * len(records)
        for i, v in zip(f.index, values):
            out[i] = v
        return out

    def _signals(self, X: np.ndarray) -> np.ndarray:
        """The rule signals that name a flag's class."""
        return anomaly_signals(X) if self.model is not None else self._rule_signals(X)

    def _model_scores(self, X: np.ndarray) -> np.ndarray:
        """Scores of the rows, in model calls of at most anomaly.max_batch rows."""
        if self.model is None:
            return self._rule_signals(X).max(axis=1)
        step = self.max_batch
        if len(X) <= step:
            return self._run(X)
        return np.concatenate([self._run(X[i:i + step]) for i in range(0, len(X), step)])

    def _rule_signals(self, X: np.ndarray) -> np.ndarray:
        """Rule scores needing no history: the statement treated as known, only error bursts and clear injection
        shapes kept. A probing function alone (current_user, version(), pg_backend_pid()...) is a weak sign here,
        as drivers and consoles call them; with a model, the model weighs it against the learned workload."""
        known = X.copy()
        known[:, _C_KNOWN] = 1.0
        probe = known[:, _C_PROBE] > 0
        known[:, _C_PROBE] = 0.0
        signals = anomaly_signals(known)
        kept = np.zeros_like(signals)
        kept[:, _I_BURST] = signals[:, _I_BURST]
        kept[:, _I_INJECTION] = signals[:, _I_INJECTION] + np.where(probe, _PROBE_WEIGHT, 0.0)
        return kept

    def _account(self, ts: list, dur, started: float) -> None:
        self.batches += 1
        n = len(ts)
        self.batch_sum += n
        self.batch_counts[bisect.bisect_left(BATCH_BUCKETS, n)] += 1
        now = time.time()
        if n <= _FEW_ROWS:      # as below, without numpy's fixed cost per call
            counts, total = self.delay_counts, 0.0
            for t, d in zip(ts, dur):
                delay = now - (t + d * 1e-6)
                total += delay
                counts[bisect.bisect_left(DELAY_BUCKETS, delay)] += 1
            self.delay_sum += float(total)
        else:
            delays = now - (np.array(ts, dtype=np.float64) + np.asarray(dur, dtype=np.float64) * 1e-6)
            self.delay_sum += float(delays.sum())
            self.delay_counts += np.bincount(_DELAY_EDGES.searchsorted(delays), minlength=len(DELAY_BUCKETS) + 1)
        self.busy_seconds += time.thread_time() - started   # the accounting above is the scorer's work too

    # ---------------------------------------------------------------- flags

    def _flag(self, rec: tuple, part: StatementRow, x: np.ndarray, score: float, signals: np.ndarray,
              now: float) -> None:
        strongest = int(np.argmax(signals))
        cls = ANOMALY_CLASSES[strongest] if signals[strongest] > 0 else UNUSUAL
        ev = FlaggedStatement(rec)
        flag = AnomalyFlag(
            flagged_at=now, completed_at=ev.ts + ev.duration_us / 1e6, score=score, cls=cls,
            why=(cls, x, part, ev, self.context), fingerprint=part.fingerprint,
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
        # The rule judges a statement against its template's fit for its rows, bytes and parameters.
        expected = float(np.expm1(x[COL["ev_expected_log"]])) if x[COL["ev_expected_log"]] > 0 else 0.0
        if expected <= 0:
            expected = float(t.p50_us or 0.0)
        factor = ev.duration_us / expected if expected > 0 else float("inf")
        return (f"took {_ms(ev.duration_us)}, {factor:.0f}x the {_ms(expected)} its template is expected to take "
                f"for its rows and parameters (template median {_ms(float(t.p50_us or 0.0))})")
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
