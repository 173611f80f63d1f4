"""The one home of pgpilot's configuration: a validated model, loaded from YAML and the environment.

Every validation error names the key path and the file it came from. Defaults are documented in
config.yaml at the repository root; keep the two in step.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A configuration problem, with the key and the file it concerns."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Database(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    dbname: str | None = None  # defaults to the entry's name
    user: str = "postgres"
    password: str | None = None
    pool_size: int | None = Field(None, ge=1)  # overrides the global pool_size
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "disable"
    sslrootcert: str | None = None


class Timeouts(_Section):
    connect: float = Field(5.0, gt=0)            # seconds to open and authenticate a backend
    query_wait: float = Field(30.0, gt=0)        # seconds a client may wait for a backend
    client_idle: float = Field(0.0, ge=0)        # close clients idle this long (0 = never)
    idle_in_transaction: float = Field(0.0, ge=0)  # close clients idle inside a transaction (0 = never)
    server_idle: float = Field(600.0, ge=0)      # close pooled backends idle this long (0 = never)
    server_lifetime: float = Field(3600.0, ge=0)  # recycle backends older than this when released (0 = never)
    query: float = Field(0.0, ge=0)              # cancel statements running longer (0 = never)
    shutdown: float = Field(30.0, ge=0)          # graceful shutdown waits this long for transactions


class QueryLogConfig(_Section):
    enabled: bool = True
    dsn: str | None = None          # log store; default: the first configured database
    queue_size: int = Field(100_000, ge=100)
    batch_size: int = Field(5_000, ge=1)
    flush_interval: float = Field(0.5, gt=0)
    retention_days: int = Field(14, ge=1)
    parameters: bool = False        # store literal values / bound parameters (separate column)
    spool_dir: str = "/tmp/pgpilot-spool"
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=0)
    write_timeout: float = Field(5.0, gt=0)          # a store connect or write slower than this goes to the spool
    reconnect_max_backoff: float = Field(10.0, gt=0)  # seconds between reconnect attempts, at most
    stop_timeout: float = Field(5.0, gt=0)           # shutdown: time to write what is queued, then spool
    templates_refresh_interval: float = Field(60.0, gt=0)  # seconds between templates.last_seen updates
    analysis_cache_size: int = Field(10_000, ge=1)   # statement analyses kept (LRU)
    stats_max_templates: int = Field(5_000, ge=1)    # templates tracked in memory for SHOW QUERIES


class CacheConfig(_Section):
    enabled: bool = False
    redis_url: str | None = None                 # without it, generations live in-process (one proxy only)
    l1_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    l1_eviction: Literal["gdsf", "lru"] = "gdsf"   # gdsf: least hits x execution time per byte first; lru: least recent
    max_entry_bytes: int = Field(1024 * 1024, ge=0)
    redis_max_bytes: int = Field(512 * 1024 * 1024, ge=0)   # bytes this proxy keeps stored in Redis, at most
    default_ttl: float = Field(300.0, gt=0)      # seconds; a backstop, invalidation is by table generation
    redis_timeout: float = Field(0.05, gt=0)     # seconds; a slower Redis answer is a bypass
    key_prefix: str = "pgpilot:"                 # Redis key prefix, so deployments can share a Redis
    breaker_failures: int = Field(5, ge=1)       # consecutive Redis timeouts/errors that open the circuit
    breaker_cooldown: float = Field(2.0, gt=0)   # seconds the cache steps aside once the circuit opened
    decoding: Literal["stream", "poll"] = "stream"   # read the decoding slot by replication protocol or by SQL
    decode_interval: float = Field(0.01, gt=0)   # poll: seconds between two reads of the slot
    decode_batch: int = Field(100_000, ge=1)     # poll: changes read per call, at most
    catalog_check_interval: float = Field(1.0, gt=0)  # seconds between catalog signature checks (DDL)
    analysis_cache_size: int = Field(50_000, ge=1)    # statement verdicts kept per proxy
    analysis_timeout: float = Field(2.0, gt=0)   # seconds a catalog probe of one statement may take
    admission_warmup: int = Field(8, ge=0)       # fills admitted per template before its statistics decide
    admission_min_saved_us: float = Field(50.0, ge=0)   # Postgres time an entry must save (reuse x exec time)
    admission_explore_every: int = Field(16, ge=1)       # a declined template is still explored 1 in N (up to 16N) times
    admission_size_scale: int = Field(65536, ge=1)       # bytes per extra min_saved_us required of an entry
    admission_lookup_us: float = Field(100.0, ge=0)      # what a missed lookup costs (0: hit ratio not judged)


class AdminConfig(_Section):
    database: str | None = "pgpilot"             # the admin console's virtual database (None: no console)
    admin_users: list[str] = Field(default_factory=lambda: ["postgres"])   # may run every console command
    stats_users: list[str] = Field(default_factory=list)                   # may run SHOW commands only
    http_listen: str | None = "127.0.0.1:9930"   # Prometheus /metrics, /healthz, /readyz (None: off)

    @field_validator("http_listen")
    @classmethod
    def _http_listen_is_host_port(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v)
        return v


class LearningConfig(_Section):
    model_dir: str = "./var/models"
    interval: str = "10m"
    collect_plans_min_calls: int = Field(20, ge=1)
    snapshot_retention_days: int = Field(30, ge=1)   # collectors' pgpilot.* snapshots older than this are deleted
    cv_folds: int = Field(3, ge=2)
    search_budget_seconds: float = Field(60.0, gt=0)
    time_model_families: list[Literal["xgboost", "random_forest", "gradient_boosting"]] = Field(
        default_factory=lambda: ["xgboost", "random_forest", "gradient_boosting"], min_length=1)
    window_days: float = Field(7.0, gt=0)             # train on the log's last N days
    holdout_fraction: float = Field(0.25, gt=0, lt=1)  # the latest share of events, held out for evaluation
    min_events: int = Field(500, ge=10)               # fewer events in the window: analysis only, no models
    max_train_rows: int = Field(150_000, ge=1000)     # events sampled to train the time model
    max_param_events: int = Field(300_000, ge=0)      # events whose parameters are loaded (sampled)
    explain_sample: int = Field(1500, ge=0)           # statements EXPLAINed per side for the cost baseline (0: off)
    heavy_p50_ms: float | None = Field(20.0, gt=0)    # heavy template: p50 at least this (null: learned split)
    olap_p50_ms: float = Field(10.0, gt=0)            # OLAP template: an analytical read with p50 at least this
    scheduled_regularity: float = Field(0.8, gt=0, le=1)  # share of inter-arrival gaps within 10% of their median
    anomaly_threshold: float = Field(0.5, gt=0)       # flag statements scoring at least this
    anomaly_slow_tolerance: float = Field(0.001, ge=0, lt=1)  # share of training traffic allowed to look slow
    cache_lookup_us: float = Field(20.0, ge=0)        # cost of a cache lookup, paid on every read of a cached template
    cache_byte_cost_us: float = Field(0.01, ge=0)     # cost of storing one byte, in microseconds of DB time


class ModelsConfig(_Section):
    """The learner's champions served in the proxy (docs/models-in-proxy.md); the registry is learning.model_dir."""
    enabled: bool = True                         # watch the registry and load its champions
    poll_interval: float = Field(1.0, gt=0)      # seconds between checks of champions/*.json
    redis_channel: str | None = "models"         # with cache.redis_url: a message on <cache.key_prefix><this> checks now
    learned_admission: bool = True               # cache admission by the cache model (when the cache is on)
    predict_times: bool = True                   # predicted execution time per template (SHOW QUERIES)
    max_templates: int = Field(10_000, ge=100)   # templates with an admission decision or predicted time kept


AnomalyClass = Literal["slow_outlier", "unusual_rows", "new_template", "error_burst", "injection"]


class AnomalyConfig(_Section):
    """Scoring of finished statements, and the inline guard (enforce) against statements shaped like attacks."""
    enabled: bool = True                         # score every finished statement (the learner's rules until a model)
    threshold: float | None = Field(None, gt=0)  # flag at this score (null: the model's own, else learning's)
    rules_without_model: bool = True             # with no model: flag injection shapes and error bursts by rule
    score_interval: float = Field(0.04, gt=0)    # seconds a finished statement waits, at most, to be scored
    max_batch: int = Field(512, ge=1)            # statements scored per model call
    queue_size: int = Field(100_000, ge=100)     # statements waiting to be scored; beyond, not scored (counted)
    recent_flags: int = Field(1000, ge=1)        # flags kept for SHOW ANOMALIES
    log_flags: bool = True                       # a pgpilot.anomaly log line per flag ...
    log_max_per_second: float = Field(50.0, gt=0)  # ... at most this many per second (the rest are counted)
    webhook_url: str | None = None               # POST each flag as JSON here (http:// or https://)
    webhook_timeout: float = Field(2.0, gt=0)
    webhook_queue: int = Field(1000, ge=1)       # flags waiting for the webhook; beyond, dropped (counted)
    notify_channel: str | None = None            # NOTIFY this channel with each flag (first database's connection)
    notify_queue: int = Field(1000, ge=1)
    enforce: list[AnomalyClass] = Field(default_factory=list)   # refuse (42501) statements of these classes inline
    guard_threshold: float = Field(1.0, gt=0)    # enforce injection: the rule score of a statement's text to refuse
    guard_cache_size: int = Field(50_000, ge=100)  # verdicts kept per statement text (constants stripped)

    @field_validator("enforce")
    @classmethod
    def _enforceable(cls, v: list[str]) -> list[str]:
        late = sorted(set(v) - {"injection", "new_template"})
        if late:
            raise ValueError(f"{', '.join(late)} can only be known after a statement ran; enforce takes "
                             "injection and new_template")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("http", "https"):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v


class AdvisorsConfig(_Section):
    storage_budget: str = "500MB"               # new indexes may take this much space ("25%": of the tables read)
    workload_window_days: float = Field(7.0, gt=0)  # how much of the query log to read
    min_calls: int = Field(1, ge=1)             # templates seen fewer times are ignored
    instances_per_template: int = Field(3, ge=1)  # sampled instances planned per template
    synthesize_parameters: bool = False         # without logged values: draw them from pg_stats (else generic plans)
    max_index_columns: int = Field(4, ge=1)     # key columns per advised index
    max_include_columns: int = Field(6, ge=0)   # INCLUDE columns per covering candidate (0: none)
    index_write_cost: float = Field(0.5, ge=0)  # planner cost units per written row per index
    min_benefit_fraction: float = Field(0.005, ge=0)  # an index must save this share of the workload cost
    min_gain_per_size: float = Field(0.25, ge=0)  # ...and this x its size / the data's size (0: no size bar)
    partial_min_share: float = Field(0.8, gt=0, le=1)  # a constant seen this often makes a partial index candidate
    unused_min_days: float = Field(7.0, ge=0)   # statistics younger than this make drop advice low-confidence
    partition_min_table_bytes: str = "1GB"      # smaller tables are partitioned only for retention
    partition_min_rows: int = Field(10_000, ge=1)  # rows per partition below which partitions get coarser
    partition_max_partitions: int = Field(1000, ge=1)
    partition_ahead: int = Field(3, ge=0)       # partitions created ahead of the newest data
    partition_sample_percent: float = Field(2.0, gt=0, le=100)  # rows copied to check a layout


AuthMethod = Literal["scram-sha-256", "md5", "trust", "reject"]


class HbaRule(_Section):
    """One pg_hba.conf-style line: who it concerns, and how they must authenticate. First match wins."""
    type: Literal["host", "hostssl", "hostnossl"] = "host"   # hostssl: TLS clients only; hostnossl: plaintext only
    database: str | list[str] = "all"
    user: str | list[str] = "all"
    address: str = "all"                        # CIDR (10.0.0.0/8, ::1/128) or all
    method: AuthMethod

    @field_validator("address")
    @classmethod
    def _address_is_cidr(cls, v: str) -> str:
        if v != "all":
            ipaddress.ip_network(v, strict=False)
        return v


class AuthConfig(_Section):
    method: AuthMethod = "scram-sha-256"        # for everyone when hba is empty
    hba: list[HbaRule] = Field(default_factory=list)  # first match wins; no match is refused (28000)
    auth_file: str | None = None                # PgBouncer userlist.txt: "user" "SCRAM-SHA-256$..." | "md5..." | "plain"
    auth_user: str | None = None                # with it, users missing from auth_file are looked up with auth_query
    auth_password: str | None = None            # auth_user's upstream password (else its plaintext auth_file entry)
    auth_query: str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    auth_dbname: str | None = None              # databases entry auth_query runs in (default: the client's, else the first)
    cache_seconds: float = Field(30.0, ge=0)    # auth_query answers are kept this long
    timeout: float = Field(60.0, gt=0)          # a client must finish authenticating within this many seconds
    max_failures: int = Field(5, ge=0)          # failed logins from one address within failure_window ... (0: no limit)
    failure_window: float = Field(60.0, gt=0)
    lockout: float = Field(60.0, gt=0)          # ... refuse that address this many seconds
    scram_iterations: int = Field(4096, ge=4096)  # for verifiers derived from plaintext auth_file secrets


class TlsConfig(_Section):
    client_mode: Literal["disable", "allow", "prefer", "require"] = "disable"
    client_cert_file: str | None = None         # PEM, the certificate chain clients verify
    client_key_file: str | None = None
    client_min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    handshake_timeout: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TlsConfig":
        if self.client_mode != "disable" and not (self.client_cert_file and self.client_key_file):
            raise ValueError("client_cert_file and client_key_file are required unless client_mode is disable")
        return self


class Config(_Section):
    listen: str = "127.0.0.1:6432"
    pool_mode: Literal["session", "transaction"] = "transaction"
    pool_size: int = Field(20, ge=1)
    max_client_conn: int = Field(1000, ge=1)
    max_client_conn_per_user: int = Field(0, ge=0)      # client connections per user name (0: no cap)
    max_client_conn_per_database: int = Field(0, ge=0)  # client connections per database (0: no cap)
    reset_query: str = "DISCARD ALL"
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["plain", "json"] = "plain"
    log_connections: bool = True    # a line per client connect and disconnect
    timeouts: Timeouts = Field(default_factory=Timeouts)
    databases: dict[str, Database] = Field(default_factory=dict)
    query_log: QueryLogConfig = Field(default_factory=QueryLogConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    learning: LearningConfig = Field(default_factory=LearningConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    advisors: AdvisorsConfig = Field(default_factory=AdvisorsConfig)
    auth: AuthConfig | None = None    # None: every client is trusted (set it in production)
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @model_validator(mode="after")
    def _fill_dbnames(self) -> "Config":
        for name, db in self.databases.items():
            if db.dbname is None:
                db.dbname = name
        return self

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.listen)

    def pool_size_for(self, database: str) -> int:
        db = self.databases[database]
        return db.pool_size or self.pool_size


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    return (host.strip("[]") or "0.0.0.0", int(port))


def database_from_url(url: str) -> tuple[str, dict]:
    """A libpq URL (postgresql://user:pass@host:port/db) as a databases entry."""
    u = urlparse(url)
    if u.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {url!r}")
    dbname = unquote(u.path.lstrip("/")) or unquote(u.username or "postgres")
    entry = {"host": u.hostname or "127.0.0.1", "port": u.port or 5432, "dbname": dbname,
             "user": unquote(u.username or "postgres")}
    if u.password:
        entry["password"] = unquote(u.password)
    return dbname, entry


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{source}: {key}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply PGPILOT_LISTEN / PGPILOT_UPSTREAM, validate."""
    env = os.environ if env is None else env
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: (top level): expected a mapping of keys")
    if env.get("PGPILOT_LISTEN"):
        raw["listen"] = env["PGPILOT_LISTEN"]
    if env.get("PGPILOT_UPSTREAM"):
        try:
            name, entry = database_from_url(env["PGPILOT_UPSTREAM"])
        except ValueError as e:
            raise ConfigError(f"PGPILOT_UPSTREAM: {e}") from None
        raw["databases"] = {name: entry}
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
