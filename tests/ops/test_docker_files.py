"""The Dockerfile, docker-compose.yaml and their config files stay in step with the code (Docker is not run here)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.config import load_config, parse_host_port

REPO = Path(__file__).resolve().parents[2]


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_image_config_takes_the_upstream_from_the_environment_and_listens_everywhere():
    config = load_config(REPO / "docker" / "config.yaml", env={"PGPILOT_UPSTREAM": "postgresql://u:p@db:5432/app"})

    assert list(config.databases) == ["app"]
    assert config.listen_address == ("0.0.0.0", 6432)
    assert parse_host_port(config.admin.http_listen) == ("0.0.0.0", 9930)


def test_compose_config_reaches_postgres_and_redis_by_service_name():
    config = load_config(REPO / "docker" / "compose-config.yaml", env={})

    assert config.databases["app"].host == "postgres"
    assert config.cache.redis_url.startswith("redis://redis:")
    assert {"postgres", "redis"} <= set(compose()["services"])


def test_image_runs_as_a_non_root_user_and_checks_healthz_on_the_metrics_port():
    text = dockerfile()
    port = parse_host_port(load_config(REPO / "docker" / "config.yaml", env={}).admin.http_listen)[1]

    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim"]
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    healthcheck = next(line for line in text.splitlines() if "CMD" in line and "urllib" in line)
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    assert '["pgpilot"]' in text and '"serve", "-c", "/etc/pgpilot/config.yaml"' in text


def test_every_file_the_image_and_compose_copy_exists():
    copied = [p for line in dockerfile().splitlines() if line.startswith("COPY")
              for p in line.split()[1:-1]]
    mounted = [v.split(":")[0] for s in compose()["services"].values() for v in s.get("volumes", [])
               if v.startswith("./")]

    missing = [p for p in copied + mounted if not (REPO / p).exists()]
    assert copied and mounted and not missing


def test_compose_postgres_has_logical_decoding_and_pg_stat_statements():
    command = " ".join(compose()["services"]["postgres"]["command"])

    assert compose()["services"]["postgres"]["image"] == "postgres:15"
    assert "wal_level=logical" in command
    assert "shared_preload_libraries=pg_stat_statements" in command
    assert compose()["services"]["redis"]["image"] == "redis:7"
