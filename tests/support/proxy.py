"""Run `pgpilot serve` as a real subprocess for tests and benchmarks."""
from __future__ import annotations

import os
import shutil
import signal
from signal import SIGINT
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import yaml

from tests.support.services import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]


class ProxyProcess:
    """A pgpilot proxy in front of one or more upstream databases, configured from a dict."""

    def __init__(self, config: dict, env: dict[str, str] | None = None):
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config = {"listen": f"{self.host}:{self.port}", **config}
        self.config.setdefault("admin", {}).setdefault("http_listen", f"127.0.0.1:{free_port()}")
        self.config.setdefault("query_log", {}).setdefault("enabled", False)
        self._tmp = tempfile.mkdtemp(prefix="pgpilot-proxy-")
        # config, log and registry go when this object does (at the latest when the test run ends)
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        # A registry of its own: never a model left in the working tree by another run.
        self.config.setdefault("learning", {}).setdefault("model_dir", str(Path(self._tmp) / "models"))
        self.config_path = Path(self._tmp) / "config.yaml"
        self.log_path = Path(self._tmp) / "proxy.log"
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def http_port(self) -> int:
        return int(self.config["admin"]["http_listen"].rpartition(":")[2])

    def dsn(self, dbname: str, user: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def write_config(self, config: dict | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait: bool = True) -> "ProxyProcess":
        self.write_config()
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        env.pop("PGPILOT_LISTEN", None)
        env.pop("PGPILOT_UPSTREAM", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgpilot", "serve", "-c", str(self.config_path)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            try:
                wait_for_port(self.host, self.port, timeout=20)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"proxy did not start:\n{self.log()}")
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = SIGINT, timeout: float = 15) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
            self.proc = None
        if self._log:
            self._log.close()
            self._log = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def upstream_entry(pg, dbname: str | None = None, **extra) -> dict:
    """A `databases:` entry pointing at a PgCluster."""
    return {"host": pg.host, "port": pg.port, "dbname": dbname or pg.dbname, "user": pg.user, **extra}
