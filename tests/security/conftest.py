"""Fixtures for the security tests: a test CA with a server certificate, auth_file writing, backend counting."""
from __future__ import annotations

import os
import subprocess

import pytest
import trustme

from proxy.auth import ScramVerifier, md5_secret

PASSWORD = "s3cret-Pass"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, str]:
    """PEM files: a CA, a server certificate it issued for 127.0.0.1 and localhost, and an unrelated CA."""
    d = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other_ca"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["key"].chmod(0o600)
    return {k: str(v) for k, v in files.items()}


@pytest.fixture
def auth_file(tmp_path):
    """write(entries) -> path of a userlist.txt with `"user" "secret"` lines."""
    path = tmp_path / "userlist.txt"

    def write(entries: dict[str, str]) -> str:
        path.write_text("".join(f'"{u}" "{s}"\n' for u, s in entries.items()))
        return str(path)

    return write


def scram_secret(password: str = PASSWORD) -> str:
    return str(ScramVerifier.from_password(password))


def md5_hash(user: str, password: str = PASSWORD) -> str:
    return md5_secret(user, password)


def proxy_backends(pg, dbname: str) -> int:
    """Connections open on the upstream to `dbname` (only the proxy's backends connect there)."""
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}' "
                       "AND backend_type = 'client backend'").strip())


def psql(proxy, dbname: str, sql: str, user: str = "postgres", password: str | None = None,
         **conninfo: str):
    """Run psql through the proxy with a conninfo string; returns the CompletedProcess."""
    params = {"host": proxy.host, "port": str(proxy.port), "dbname": dbname, "user": user,
              "connect_timeout": "10", **conninfo}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(["psql", "-X", "-At", "-w", "-c", sql, " ".join(f"{k}={v}" for k, v in params.items())],
                          capture_output=True, text=True, env=env, timeout=60)
