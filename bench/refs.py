"""Reference poolers for benchmarks: PgBouncer (the Debian package) run as a throwaway subprocess."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.services import free_port, stop_process, wait_for_port

PGBOUNCER = "/usr/sbin/pgbouncer"


def pgbouncer_version(binary: str = PGBOUNCER) -> tuple[int, ...]:
    """PgBouncer's version as a tuple, e.g. (1, 18, 0)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise RuntimeError(f"cannot read the PgBouncer version from {out!r}")
    return tuple(int(g or 0) for g in match.groups())


class PgBouncer:
    """A private PgBouncer in front of one upstream server, on a free port, with any client user accepted.

    Every database name is routed to the upstream (wildcard entry) and logs in as `user`.
    `max_prepared_statements` is only written for PgBouncer >= 1.21, which introduced it;
    `supports_prepared` says whether named prepared statements work in transaction mode.
    """

    def __init__(self, upstream_host: str, upstream_port: int, user: str = "postgres",
                 pool_mode: str = "transaction", pool_size: int = 20, max_client_conn: int = 1000,
                 max_prepared_statements: int = 200, port: int | None = None, binary: str = PGBOUNCER):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binary = binary
        self.version = pgbouncer_version(binary)
        self.pool_mode = pool_mode
        self.supports_prepared = pool_mode == "session" or self.version >= (1, 21)
        self._tmp = Path(tempfile.mkdtemp(prefix="pgpilot-pgbouncer-"))
        settings = {
            "listen_addr": self.host,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "any",
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
            "max_client_conn": max_client_conn,
            "server_reset_query": "DISCARD ALL",
            "ignore_startup_parameters": "extra_float_digits,options,search_path",
            "logfile": self._tmp / "pgbouncer.log",
            "pidfile": self._tmp / "pgbouncer.pid",
            "log_connections": 0,
            "log_disconnections": 0,
        }
        if self.version >= (1, 21):
            settings["max_prepared_statements"] = max_prepared_statements
        ini = [f"[databases]\n* = host={upstream_host} port={upstream_port} user={user}\n", "[pgbouncer]\n"]
        ini += [f"{k} = {v}\n" for k, v in settings.items()]
        self.config_path = self._tmp / "pgbouncer.ini"
        self.config_path.write_text("".join(ini))
        self.proc: subprocess.Popen | None = None

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}"

    def start(self) -> "PgBouncer":
        command = [self.binary, "-q", str(self.config_path)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it drops to the postgres user, which must own its files.
            shutil.chown(self._tmp, "postgres", "postgres")
            for f in self._tmp.iterdir():
                shutil.chown(f, "postgres", "postgres")
            command[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.host, self.port, timeout=20)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"pgbouncer did not start:\n{self.log()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self._tmp / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""
