"""Collectors: time-stamped snapshots of what PostgreSQL knows about itself, written to pgpilot.* in the log store.

`run_collectors(store_dsn, target_dsns)` runs them all once; docs/logstore.md describes every table they write.
"""
from learning.collectors.runner import COLLECTORS, run_collectors

__all__ = ["COLLECTORS", "run_collectors"]
