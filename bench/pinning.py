"""Where a benchmark's processes run: the system under test on a CPU of its own, the load and Postgres elsewhere."""
from __future__ import annotations

import os
from contextlib import contextmanager


class Pinning:
    """The proxies on one CPU of their own, everything else (Postgres, pgbench, this process) on the others.

    Unpinned, 16 pgbench clients' backends and pgbench's threads share every CPU with a proxy's one thread, which
    waits for a CPU behind them: the load competes with the system under test, and throughput swings with the
    scheduler. Pinned, the proxy's CPU runs nothing else (Postgres and pgbench may still limit the throughput).
    Processes inherit the CPUs of the process that starts them, so proxies are started inside `for_proxy()`;
    with fewer than two CPUs nothing is pinned."""

    def __init__(self, enabled: bool):
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cpus) >= 2
        self.proxy_cpus = {cpus[-1]} if self.enabled else set(cpus)
        self.other_cpus = set(cpus[:-1]) if self.enabled else set(cpus)
        if self.enabled:
            os.sched_setaffinity(0, self.other_cpus)

    @contextmanager
    def for_proxy(self):
        if not self.enabled:
            yield
            return
        os.sched_setaffinity(0, self.proxy_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.other_cpus)

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned"
        return f"proxies on CPU {fmt_cpus(self.proxy_cpus)}, Postgres and pgbench on CPU {fmt_cpus(self.other_cpus)}"


def fmt_cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))
