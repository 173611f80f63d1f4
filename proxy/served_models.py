"""The learner's models at work inside the proxy: one object that ProxyServer starts and stops.

`ServedModels` wires together
  ModelWatcher       the registry's champions (anomaly, cache, time), hot-swapped (proxy/modelwatch.py)
  AnomalyScorer      server.scorer: every finished statement scored off the client's path (proxy/scoring.py)
  alert sinks        webhook and NOTIFY for flags (proxy/alerts.py)
  StatementGuard     server.guard, only while anomaly.enforce names a class (proxy/guard.py)
  LearnedAdmission   installed as server.cache.admission when the result cache is on
  TimePredictions    predicted execution time per template (`predicted_ms`, SHOW QUERIES)
and adds the console commands SHOW ANOMALIES, SHOW MODELS and SHOW ADMISSION and the pgpilot_model_*,
pgpilot_anomaly_*, pgpilot_guard_* and pgpilot_admission_* metric families. Every part works without a
model: the scorer on the learner's rules, admission on the heuristic, and no predicted times.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from proxy.admin import BOOL, FLOAT8, INT8, TEXT, TIMESTAMPTZ, AdminError, AdminRequest, Result
from proxy.analysis import Analyzer, literal_key
from proxy.features import transform_one
from proxy.modelwatch import ModelWatcher
from proxy.scoring import BATCH_BUCKETS, DELAY_BUCKETS, FLAG_CLASSES, AnomalyScorer

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger("pgpilot.models")

_BACKGROUND_EVERY = 0.05     # seconds between two passes over templates waiting for a prediction or a decision
_PER_PASS = 256              # templates scored per pass, at most
_MISSING = object()


class AdmissionDecision:
    __slots__ = ("fingerprint", "probability", "admit", "query")

    def __init__(self, fingerprint: str, probability: float, admit: bool, query: str):
        self.fingerprint = fingerprint
        self.probability = probability
        self.admit = admit
        self.query = query


class LearnedAdmission:
    """Cache admission by the cache model: admit a template's results when P(caching pays) >= the model's admit_at.

    A template is scored once, in the background, from the same features the learner trained on (statement
    shape plus the template's statistics in the model's serving context), and again whenever a new model or
    context comes into service. Until then, for templates the learner has no statistics of, and while no
    model is in service, the heuristic policy decides. The cache names a template by its SQL text, which for
    simple-protocol clients carries the literal values; decisions are kept by the text with its constants
    stripped, so one decision serves every value. Implements proxy.cache.admission.AdmissionPolicy.
    """

    def __init__(self, fallback, analyzer: Analyzer, max_templates: int = 10_000):
        self.fallback = fallback
        self.analyzer = analyzer
        self.max_templates = max_templates
        self.model = None
        self.context = None
        self.admit_at = 0.5
        self._by_key: dict[str, AdmissionDecision | None] = {}   # None: the heuristic decides this template
        self._by_fingerprint: dict[str, AdmissionDecision] = {}
        self._pending: dict[str, str] = {}                        # stripped text -> one of its texts
        self._key_of: dict[str, str] = {}                         # text -> stripped text
        self.decisions: Counter[tuple[str, bool]] = Counter()     # (model | heuristic, admitted)

    def use_model(self, model) -> None:
        self.model = model
        self.context = model.context if model is not None else None
        self.admit_at = float(model.metadata.get("admit_at", 0.5)) if model is not None else 0.5
        self._by_key.clear()
        self._by_fingerprint.clear()
        self._pending.clear()

    def admit(self, stats) -> bool:
        text = stats.template     # the template's first text: the same string object call after call
        key = self._key_of.get(text)
        if key is None:
            if len(self._key_of) >= self.max_templates:
                self._key_of.clear()
            key = self._key_of[text] = literal_key(text)[0]
        decision = self._by_key.get(key, _MISSING)
        if decision is _MISSING:
            if self.model is not None and len(self._pending) < self.max_templates:
                self._pending.setdefault(key, text)
            decision = None
        if decision is None:
            admitted = self.fallback.admit(stats)
            self.decisions["heuristic", admitted] += 1
            return admitted
        self.decisions["model", decision.admit] += 1
        return decision.admit

    def process(self) -> int:
        """Score templates waiting for a decision (a bounded number per call); returns how many were decided."""
        model, ctx = self.model, self.context
        if not self._pending or model is None:
            return 0
        keys = list(self._pending)[:_PER_PASS]
        rows, fresh = [], []
        for key in keys:
            info = self.analyzer.analyze(self._pending.pop(key))
            s = info.statements[0] if len(info.statements) == 1 else info
            decision = self._by_fingerprint.get(s.fingerprint)
            template = ctx.templates.get(s.fingerprint) if ctx is not None else None
            if decision is None and template is not None:
                rows.append(transform_one({"sql": s.normalized, "template": template}, "cache"))
                fresh.append((key, s))
                continue
            self._remember(key, decision)
        if rows:
            probabilities = model.run(np.stack(rows))
            for (key, s), p in zip(fresh, probabilities.tolist()):
                decision = AdmissionDecision(s.fingerprint, p, p >= self.admit_at, s.normalized)
                self._by_fingerprint[s.fingerprint] = decision
                self._remember(key, decision)
        return len(keys)

    def _remember(self, key: str, decision: AdmissionDecision | None) -> None:
        if len(self._by_key) >= self.max_templates:
            self._by_key.clear()
        self._by_key[key] = decision

    def table(self) -> list[AdmissionDecision]:
        return sorted(self._by_fingerprint.values(), key=lambda d: -d.probability)


class TimePredictions:
    """Predicted execution time (ms) per template fingerprint from the time model, without parameter values."""

    def __init__(self, max_templates: int = 10_000):
        self.max_templates = max_templates
        self.model = None
        self.context = None
        self.predicted_ms: dict[str, float] = {}
        self._templates: dict[str, str] = {}     # fingerprint -> normalized text, to predict again after a swap
        self._pending: dict[str, str] = {}

    def use_model(self, model) -> None:
        self.model = model
        self.context = model.context if model is not None else None
        self.predicted_ms.clear()
        self._pending = dict(self._templates) if model is not None else {}

    def observe(self, fingerprint: str, normalized: str) -> None:
        """A template seen in traffic: predict its time at the next pass (O(1))."""
        if fingerprint in self._templates:
            return
        if len(self._templates) >= self.max_templates:
            self._templates.clear()
            self.predicted_ms.clear()
        self._templates[fingerprint] = normalized
        if self.model is not None:
            self._pending[fingerprint] = normalized

    def process(self) -> int:
        if not self._pending or self.model is None:
            return 0
        items = list(self._pending.items())[:_PER_PASS]
        for fingerprint, _ in items:
            del self._pending[fingerprint]
        self.predict(items)
        return len(items)

    def predict(self, items: list[tuple[str, str]]) -> list[float | None]:
        """Predicted ms for (fingerprint, normalized text) pairs (None without a model); remembered."""
        model, ctx = self.model, self.context
        if model is None or not items:
            return [None] * len(items)
        now = time.time()
        rows = [transform_one({"sql": normalized, "parameters": None, "ts": now,
                               "template": ctx.established(fp) if ctx is not None else None}, "time")
                for fp, normalized in items]
        ln_us = model.run(np.stack(rows))
        out = []
        for (fp, normalized), v in zip(items, ln_us.tolist()):
            ms = math.exp(min(v, 50.0)) / 1000.0
            self._templates.setdefault(fp, normalized)
            self.predicted_ms[fp] = ms
            out.append(ms)
        return out

    def predicted_for(self, fingerprint: str, normalized: str) -> float | None:
        ms = self.predicted_ms.get(fingerprint)
        if ms is None and self.model is not None:
            ms = self.predict([(fingerprint, normalized)])[0]
        return ms


class ServedModels:
    """Models, scoring, guard, admission and predictions of one proxy process; see the module docstring."""

    def __init__(self, server: "ProxyServer"):
        self.server = server
        self.watcher: ModelWatcher | None = None
        self.scorer: AnomalyScorer | None = None
        self.guard = None
        self.admission: LearnedAdmission | None = None
        self.times: TimePredictions | None = None
        self.sinks: list = []
        self._task: asyncio.Task | None = None

    @property
    def predicted_ms(self) -> dict[str, float]:
        """Fingerprint -> predicted execution time (ms) of the templates seen so far."""
        return self.times.predicted_ms if self.times is not None else {}

    async def start(self) -> None:
        server = self.server
        config = server.config
        mcfg, acfg = config.models, config.anomaly
        analyzer = server.query_log.analyzer if server.query_log is not None else Analyzer(
            config.query_log.analysis_cache_size)
        redis_channel = (config.cache.key_prefix + mcfg.redis_channel
                         if config.cache.redis_url and mcfg.redis_channel else None)
        self.watcher = ModelWatcher(config.learning.model_dir, mcfg.poll_interval,
                                    redis_url=config.cache.redis_url, redis_channel=redis_channel)
        if acfg.enabled:
            self.scorer = AnomalyScorer(acfg, analyzer, with_parameters=config.query_log.parameters,
                                        default_threshold=config.learning.anomaly_threshold)
            if server.query_log is not None:
                # One feed: each batch is analysed once, scored, then logged with its scores.
                feed = self.scorer.feed = server.query_log.feed
                feed.scorer = self.scorer
                feed.interval = min(feed.interval, acfg.score_interval)
            # No query log to fill and no parameters to score: a statement already known normal needs no record.
            self.scorer.inline = server.query_log is None and not config.query_log.parameters
            self._start_sinks()
            self.scorer.sinks = self.sinks
            self.scorer.start()
            self.watcher.on_change("anomaly", self.scorer.use_model)
        if acfg.enforce:
            from proxy.guard import StatementGuard
            self.guard = StatementGuard(acfg.enforce, acfg.guard_threshold, acfg.guard_cache_size, analyzer)
            self.watcher.on_change("anomaly", self.guard.use_model)
        if mcfg.learned_admission and server.cache is not None:
            self.admission = LearnedAdmission(server.cache.admission, analyzer, mcfg.max_templates)
            server.cache.admission = self.admission
            self.watcher.on_change("cache", self.admission.use_model)
        if mcfg.predict_times:
            self.times = TimePredictions(mcfg.max_templates)
            self.watcher.on_change("time", self.times.use_model)
            if self.scorer is not None:
                self.scorer.on_template = self.times.observe
        if mcfg.enabled:
            await self.watcher.start()
        self._task = asyncio.get_running_loop().create_task(self._background(), name="models-background")
        self._register_commands()
        server.scorer = self.scorer
        server.guard = self.guard
        log.info("models: registry %s%s%s%s", config.learning.model_dir if mcfg.enabled else "not watched",
                 ", anomaly scoring on" if self.scorer else "", f", enforcing {', '.join(acfg.enforce)}"
                 if self.guard else "", ", learned cache admission" if self.admission else "")

    def _start_sinks(self) -> None:
        from proxy.alerts import NotifySink, WebhookSink
        acfg = self.server.config.anomaly
        if acfg.webhook_url:
            self.sinks.append(WebhookSink(acfg.webhook_url, acfg.webhook_timeout, acfg.webhook_queue))
        if acfg.notify_channel and self.server.config.databases:
            dsn = self.server.database_dsn(next(iter(self.server.config.databases)))
            self.sinks.append(NotifySink(dsn, acfg.notify_channel, acfg.notify_queue))
        for sink in self.sinks:
            sink.start()

    async def stop(self) -> None:
        if self.scorer is not None:
            self.scorer.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for sink in self.sinks:
            await sink.stop()
        if self.watcher is not None:
            await self.watcher.stop()

    async def _background(self) -> None:
        """Admission decisions and time predictions for templates seen since the last pass."""
        while True:
            await asyncio.sleep(_BACKGROUND_EVERY)
            try:
                if self.admission is not None:
                    self.admission.process()
                if self.times is not None:
                    self.times.process()
            except Exception:  # a model that fails on some template must not stop the others
                log.exception("scoring templates for admission or time prediction failed")

    # ---------------------------------------------------------------- console

    def _register_commands(self) -> None:
        reg = self.server.console.register
        reg("SHOW ANOMALIES", self.show_anomalies, "recently flagged statements with class, score and reason",
            usage="SHOW ANOMALIES [n] [class]")
        reg("SHOW MODELS", self.show_models, "the learner's models in service, loads and refusals")
        reg("SHOW ADMISSION", self.show_admission, "cache admission decided by the cache model, per template")

    def show_anomalies(self, req: AdminRequest) -> Result:
        if self.scorer is None:
            raise AdminError("55000", "anomaly scoring is off", hint="set anomaly.enabled: true and restart")
        n, cls = 50, None
        for a in req.args:
            if a.isdigit():
                n = int(a)
            elif a.lower() in FLAG_CLASSES:
                cls = a.lower()
            else:
                raise AdminError("42601", f"unknown anomaly class {a!r}", hint=f"one of {', '.join(FLAG_CLASSES)}")
        rows = [(_ts(f.flagged_at), f.cls, round(f.score, 4), f.reason, f.fingerprint, f.database, f.username,
                 f.application_name, f.client_addr, round(f.duration_us / 1000, 3), f.rows, f.sqlstate,
                 round(f.delay_ms, 3), f.model, f.query) for f in self.scorer.top(n, cls)]
        return Result([("flagged_at", TIMESTAMPTZ), ("class", TEXT), ("score", FLOAT8), ("reason", TEXT),
                       ("fingerprint", TEXT), ("database", TEXT), ("user", TEXT), ("application_name", TEXT),
                       ("client_addr", TEXT), ("duration_ms", FLOAT8), ("rows", INT8), ("sqlstate", TEXT),
                       ("delay_ms", FLOAT8), ("model", TEXT), ("query", TEXT)], rows)

    def show_models(self, req: AdminRequest) -> Result:
        rows = []
        for d in self.watcher.describe():
            used_by = {"anomaly": "scoring" + (", guard" if self.guard else "") if self.scorer else "",
                       "cache": "admission" if self.admission else "", "time": "predictions" if self.times else ""}
            rows.append((d["kind"], d["sha256"], d["algorithm"], d["version"], d["feature_version"],
                         _ts(d["loaded_at"]) if d["loaded_at"] else None, d["loads"], d["refused"],
                         used_by[d["kind"]] or None, d["last_refusal"]))
        return Result([("kind", TEXT), ("sha256", TEXT), ("algorithm", TEXT), ("version", TEXT),
                       ("feature_version", INT8), ("loaded_at", TIMESTAMPTZ), ("loads", INT8), ("refused", INT8),
                       ("used_by", TEXT), ("last_refusal", TEXT)], rows)

    def show_admission(self, req: AdminRequest) -> Result:
        if self.admission is None:
            raise AdminError("55000", "learned cache admission is off",
                             hint="it needs cache.enabled and models.learned_admission")
        rows = [(d.fingerprint, round(d.probability, 4), d.admit, d.query) for d in self.admission.table()]
        return Result([("fingerprint", TEXT), ("probability", FLOAT8), ("admit", BOOL), ("query", TEXT)], rows)

    # ---------------------------------------------------------------- metrics

    def metric_families(self):
        """pgpilot_model_*, pgpilot_anomaly_*, pgpilot_guard_*, pgpilot_admission_* (read at scrape time)."""
        w = self.watcher
        if w is not None:
            info = GaugeMetricFamily("pgpilot_model_info", "The model in service per kind (always 1)",
                                     labels=["kind", "sha256", "algorithm", "version"])
            loaded = GaugeMetricFamily("pgpilot_model_loaded_timestamp_seconds",
                                       "When the model in service was loaded (Unix time)", labels=["kind"])
            loads = CounterMetricFamily("pgpilot_model_loads", "Models loaded into service", labels=["kind"])
            refused = CounterMetricFamily("pgpilot_models_refused",
                                          "Champions refused (corrupt, mismatched or unloadable)", labels=["kind"])
            for kind in w.kinds:
                m = w.current[kind]
                if m is not None:
                    info.add_metric([kind, m.sha256[:12], str(m.metadata.get("algorithm", "")),
                                     str(m.metadata.get("version", ""))], 1)
                    loaded.add_metric([kind], w.loaded_at.get(kind, 0.0))
                loads.add_metric([kind], w.loads[kind])
                refused.add_metric([kind], w.refused[kind])
            yield from (info, loaded, loads, refused)
        s = self.scorer
        if s is not None:
            s.settle()
            scored = CounterMetricFamily("pgpilot_anomaly_scored", "Statements scored, by model or by rules",
                                         labels=["source"])
            for source in ("model", "rules"):
                scored.add_metric([source], s.scored[source])
            yield scored
            yield CounterMetricFamily("pgpilot_anomaly_scored_inline",
                                      "Of the statements scored, those counted at completion in a range already "
                                      "known to score below the threshold (no record)", value=s.scored_inline)
            yield CounterMetricFamily("pgpilot_anomaly_unscored",
                                      "Statements not scored (buffer full, failed batch, or nothing to score with)",
                                      value=s.unscored)
            flags = CounterMetricFamily("pgpilot_anomaly_flags", "Statements flagged as anomalies, by class",
                                        labels=["class"])
            for cls in FLAG_CLASSES:
                flags.add_metric([cls], s.flags[cls])
            yield flags
            yield CounterMetricFamily("pgpilot_anomaly_log_suppressed",
                                      "Flags not logged because of anomaly.log_max_per_second", value=s.log_suppressed)
            yield CounterMetricFamily("pgpilot_anomaly_scoring_cpu_seconds",
                                      "CPU time spent scoring batches (features, model, flags)", value=s.busy_seconds)
            yield _histogram("pgpilot_anomaly_scoring_delay_seconds",
                             "From a statement's completion to its score (queueing plus scoring)",
                             DELAY_BUCKETS, s.delay_counts, s.delay_sum)
            yield _histogram("pgpilot_anomaly_batch_size", "Statements per scoring batch", BATCH_BUCKETS,
                             s.batch_counts, s.batch_sum)
            yield GaugeMetricFamily("pgpilot_anomaly_threshold", "Score at which a statement is flagged",
                                    value=s.threshold)
            if self.sinks:
                alerts = CounterMetricFamily("pgpilot_anomaly_alerts", "Flags handed to alert sinks, by result",
                                             labels=["sink", "result"])
                for sink in self.sinks:
                    for result in ("sent", "failed", "dropped"):
                        alerts.add_metric([sink.name, result], sink.counts[result])
                yield alerts
        g = self.guard
        if g is not None:
            yield CounterMetricFamily("pgpilot_guard_checks", "Query/Parse messages checked by the guard",
                                      value=g.checks)
            refused = CounterMetricFamily("pgpilot_guard_refused", "Statements refused inline (42501), by class",
                                          labels=["class"])
            for cls in sorted(g.enforce):
                refused.add_metric([cls], g.refused[cls])
            yield refused
        a = self.admission
        if a is not None:
            decisions = CounterMetricFamily("pgpilot_admission_decisions",
                                            "Cache admission decisions, by who decided and the verdict",
                                            labels=["source", "verdict"])
            for source in ("model", "heuristic"):
                for admitted in (True, False):
                    decisions.add_metric([source, "admit" if admitted else "decline"], a.decisions[source, admitted])
            yield decisions
        if self.times is not None:
            yield GaugeMetricFamily("pgpilot_time_predictions", "Templates with a predicted execution time",
                                    value=len(self.times.predicted_ms))


def _histogram(name: str, doc: str, bounds, counts: list[int], total: float) -> HistogramMetricFamily:
    buckets, cumulative = [], 0
    for bound, n in zip([floatToGoString(b) for b in bounds] + ["+Inf"], counts):
        cumulative += n
        buckets.append((bound, cumulative))
    h = HistogramMetricFamily(name, doc)
    h.add_metric([], buckets, total)
    return h


def _ts(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
