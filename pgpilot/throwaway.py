"""Throwaway PostgreSQL and Redis servers for the demo, benchmarks and tests.

Each server lives in its own temporary directory on a free port and is removed on stop;
nothing depends on state left by an earlier run.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(0.05)


class PgCluster:
    """A private PostgreSQL cluster: initdb in a temp dir, started on a free port, trust auth."""

    DEFAULT_SETTINGS = {
        "wal_level": "logical",
        "shared_preload_libraries": "pg_stat_statements",
        "max_connections": "300",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_replication_slots": "10",
        "max_wal_senders": "10",
        "shared_buffers": "128MB",
        "unix_socket_directories": "",
        "listen_addresses": "127.0.0.1",
        "log_min_messages": "warning",
    }

    def __init__(self, settings: dict[str, str] | None = None, port: int | None = None):
        self.bindir = pg_bindir()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.user = "postgres"
        self.dbname = "postgres"
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self.datadir: Path | None = None
        self._tmp: str | None = None
        self._as_user: list[str] = []

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_user + list(args), capture_output=True, text=True, check=check)

    def init(self) -> "PgCluster":
        self._tmp = tempfile.mkdtemp(prefix="pgpilot-pg-")
        self.datadir = Path(self._tmp) / "data"
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the server as the postgres system user.
            shutil.chown(self._tmp, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                  "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = '{v}'\n")
        with open(self.datadir / "pg_hba.conf", "a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")
        return self

    def start(self) -> "PgCluster":
        if self.datadir is None:
            self.init()
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(Path(self._tmp) / "log"),
                  "-o", f"-p {self.port}", "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.datadir is not None:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.datadir = None

    def psql(self, sql: str, dbname: str | None = None, check: bool = True) -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", dbname or self.dbname, "-c", sql],
            capture_output=True, text=True, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def clone_database(self, template: str, name: str, attempts: int = 60) -> None:
        """CREATE DATABASE name TEMPLATE template, retried while autovacuum briefly holds the template open."""
        for attempt in range(attempts):
            try:
                self.psql(f"CREATE DATABASE {name} TEMPLATE {template}")
                return
            except RuntimeError as e:
                if "being accessed by other users" not in str(e) or attempt == attempts - 1:
                    raise
                time.sleep(0.5)

    @property
    def logfile(self) -> Path | None:
        return Path(self._tmp) / "log" if self._tmp else None


class ExternalPg(PgCluster):
    """A PostgreSQL server given by DSN (PGPILOT_TEST_DSN); never started or stopped here."""

    def __init__(self, dsn: str):
        from urllib.parse import urlparse
        u = urlparse(dsn)
        super().__init__(port=u.port or 5432)
        self.host = u.hostname or "127.0.0.1"
        self.user = u.username or "postgres"
        self.dbname = (u.path or "/postgres").lstrip("/") or "postgres"

    def init(self):
        return self

    def start(self):
        return self

    def stop(self, mode: str = "fast") -> None:
        pass

    def destroy(self) -> None:
        pass


class RedisServer:
    """A private Redis on a free port with no persistence."""

    def __init__(self, port: int | None = None):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._tmp = tempfile.mkdtemp(prefix="pgpilot-redis-")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", self.host, "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self._tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)


class ExternalRedis(RedisServer):
    def __init__(self, url: str):
        from urllib.parse import urlparse
        u = urlparse(url)
        self._url = url
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self.proc = None
        self._tmp = tempfile.mkdtemp(prefix="pgpilot-redis-")

    @property
    def url(self) -> str:
        return self._url

    def start(self):
        return self

    def stop(self) -> None:
        pass
