"""The inline statement guard (anomaly.enforce): refuse injection-shaped or unknown statements before Postgres sees them.

The session calls `StatementGuard.check(raw)` with every Query and Parse message while anomaly.enforce names
a class; a reason string makes it answer 42501 instead of forwarding. Only what the text itself shows can be
decided before a statement runs, so two classes are enforceable:
  injection      the learner's injection rule (proxy.features.anomaly_signals) on the text's own features:
                 constant comparisons (tautologies), stacked statements, UNION NULL probes, probing
                 functions, and weaker signs (comments, catalog reads, UNION, DDL) that add up; refused at
                 anomaly.guard_threshold (1.0: one strong sign, or three weak ones)
  new_template   a statement whose template the anomaly model's serving context does not count as
                 established (an allowlist learned from the log); nothing is refused while no context exists
Verdicts are cached by the text with its constants stripped (texts differing only in literal values share
one; a text with comments is cached whole), so a repeated shape costs one dictionary lookup plus the strip.
"""
from __future__ import annotations

import logging
from collections import Counter

from proxy.analysis import Analyzer, literal_key
from proxy.features import ANOMALY_CLASSES, anomaly_signals, transform_one
from proxy.scoring import COL, injection_signs

log = logging.getLogger("pgpilot.guard")

_Q, _P = ord("Q"), ord("P")
_INJECTION = ANOMALY_CLASSES.index("injection")
_ALLOW = ""      # cached verdict: let it through


class StatementGuard:
    """Decides inline, from a statement's text alone, whether it may reach Postgres."""

    def __init__(self, enforce, threshold: float = 1.0, cache_size: int = 50_000, analyzer: Analyzer | None = None):
        self.enforce = frozenset(enforce)
        self.threshold = threshold
        self.cache_size = cache_size
        self.analyzer = analyzer if analyzer is not None else Analyzer()
        self.context = None                      # ServingContext of the anomaly model in service, if any
        self._by_raw: dict[bytes, str] = {}      # exact message text -> verdict (Parse texts repeat)
        self._by_key: dict[str, str] = {}        # constants-stripped text -> verdict
        self.checks = 0
        self.refused: Counter[str] = Counter()   # by class

    def use_model(self, model) -> None:
        """A new anomaly model: its serving context decides new_template from now on."""
        self.context = model.context if model is not None else None
        self._by_raw.clear()
        self._by_key.clear()

    def check(self, raw: bytes) -> str | None:
        """None to forward the Query/Parse message, or why it is refused."""
        self.checks += 1
        if raw[0] == _Q:
            text = raw[5:-1]
        elif raw[0] == _P:
            start = raw.find(0, 5) + 1
            end = raw.find(0, start) if start else -1
            if end < 0:
                return None      # a malformed Parse: the session refuses it with 08P01 on its own
            text = raw[start:end]
        else:
            return None
        verdict = self._by_raw.get(text)
        if verdict is None:
            verdict = self._verdict(text.decode("utf-8", "replace"))
            if len(self._by_raw) >= self.cache_size:
                self._by_raw.clear()
            self._by_raw[text] = verdict
        if not verdict:
            return None
        self.refused[verdict.split(":", 1)[0]] += 1
        return verdict

    def _verdict(self, sql: str) -> str:
        if "--" in sql or "/*" in sql:
            key = sql        # comments are a sign themselves: the stripped key would lose them
        else:
            key, _ = literal_key(sql)
        verdict = self._by_key.get(key)
        if verdict is None:
            verdict = self.decide(sql)
            if len(self._by_key) >= self.cache_size:
                self._by_key.clear()
            self._by_key[key] = verdict
        return verdict

    def decide(self, sql: str) -> str:
        """The verdict on one text, uncached: "" to allow, else "<class>: <reason>"."""
        ctx = self.context
        if "new_template" in self.enforce and ctx is not None:
            unknown = [s for s in self.analyzer.analyze(sql).statements if ctx.established(s.fingerprint) is None]
            if unknown:
                return f"new_template: template {unknown[0].fingerprint} is not in the learned workload"
        if "injection" in self.enforce:
            x = injection_row(sql)
            score = float(anomaly_signals(x.reshape(1, -1))[0, _INJECTION])
            if score >= self.threshold:
                return f"injection: statement shaped like an injection ({', '.join(injection_signs(x))})"
        return _ALLOW


def injection_row(sql: str):
    """The anomaly feature row of a statement text judged on its own: sender familiar, template counted as known,
    so that only the text's signs score (the unknown-template bonus would refuse every new statement)."""
    x = transform_one({"sql": sql, "parameters": None, "app_known": True, "client_known": True}, "anomaly")
    x[COL["hist_known"]] = 1.0
    return x
