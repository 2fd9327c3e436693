"""Typed settings of each service, read once from the environment at start-up and passed down.

Every field can be set with an environment variable `<PREFIX><FIELD>` (e.g. GENIE_GATEWAY_PORT=50051).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSecurity(BaseSettings):
    """Who may call a genie.v1 server and over what channel (services/auth.py): API keys, scopes and TLS.

    Shared by GatewaySettings and JobsSettings, each under its own prefix (GENIE_GATEWAY_AUTH, GENIE_JOBS_AUTH...).
    Keys are hashed when read; only hashes are kept.
    """

    auth: Literal["api-key", "none"] = Field(
        "api-key", description="api-key: every service call needs a known key; none: no auth (development "
        "only; every caller is 'anonymous')")
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict, description='caller name -> API key or "sha256:HEX" of it, JSON; all scopes '
        '(prefer api_keys_file: environment variables leak into process listings)')
    api_keys_file: Path | None = Field(
        None, description="secret file, one 'NAME KEY [SCOPES]' or 'NAME sha256:HEX [SCOPES]' per line; scopes "
        "read, play, train, comma-separated (default: all)")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS (with tls_key_file)")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle: require client certificates it "
                                            "signed (mTLS)")


class GatewaySettings(ServerSecurity):
    """The session gateway (`genie serve gateway`); env prefix GENIE_GATEWAY_."""

    model_config = SettingsConfigDict(env_prefix="GENIE_GATEWAY_", frozen=True)

    host: str = Field("127.0.0.1", description="address the gRPC and metrics servers bind (0.0.0.0: all interfaces)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one)")
    backend: str = Field("inprocess", description="model backend plugin (entry point group genie.backends)")
    models: dict[str, str] = Field(
        default_factory=dict,
        description='model name -> checkpoint directory, JSON: {"coinrun-tiny": "out/demo/world"}')
    device: str = Field("cpu", description="torch device of the inprocess backend (cpu, cuda, cuda:1)")
    max_worlds: int = Field(64, ge=1, description="open worlds per gateway; more get RESOURCE_EXHAUSTED")
    idle_timeout_s: float = Field(600.0, gt=0, description="a world not stepped for this long is closed")
    max_image_bytes: int = Field(8 * 2**20, ge=1, description="largest prompt image accepted, in bytes")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest prompt image accepted, width*height")
    step_deadline_s: float = Field(30.0, gt=0, description="longest a step may take when the call sets no deadline; "
                                   "a call to one model-service replica gets half of it, so a hung one fails over")
    batch_window_ms: float = Field(2.0, ge=0, description="how long a step waits for others to share its batch")
    max_batch: int = Field(64, ge=1, description="most worlds stepped in one backend call")
    max_message_bytes: int = Field(32 * 2**20, ge=2**20, description="gRPC send/receive message size limit")
    rpc_threads: int = Field(32, ge=2, description="threads for blocking work (image decode, world store); "
                             "open Play streams hold none")
    shutdown_grace_s: float = Field(10.0, ge=0, description="time in-flight calls get to finish on SIGTERM")
    log_level: str = Field("INFO", description="logging level of the JSON log lines")
    # World store (services/worldstore): where each world's truth lives, so it outlives this process.
    world_store: str = Field("memory", description="world store plugin (entry point group genie.worlds): "
                             "memory (this process only) or redis (shared, survives restarts)")
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"),
                                 description="world_store=redis: redis://[:PASSWORD@]HOST:PORT/DB (never logged)")
    redis_timeout_s: float = Field(2.0, gt=0, description="world_store=redis: connect and command timeout")
    world_store_prefix: str = Field("genie:", description="world_store=redis: key prefix of this deployment")
    max_worlds_per_key: int = Field(16, ge=1, description="open worlds one caller may hold")
    steps_per_second_per_key: float = Field(200.0, gt=0, description="sustained steps/s one caller may run "
                                            "(bursts up to one second's worth) on this gateway")
    # Used only by backend="triton" (services/backends/triton.py): where each model's three Triton services
    # listen. JSON: {"coinrun": {"tokenizer": "10.0.0.5:8001", "lam": "10.0.0.6:8001", "dynamics": "10.0.0.7:8001"}}
    # Replicas: "dynamics": "10.0.0.7:8001,10.0.0.8:8001" (static), or one headless Service name (dns).
    triton_endpoints: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="model name -> {tokenizer|lam|dynamics: Triton gRPC host:port, read by the discovery plugin} "
        "(backend=triton only)")
    discovery: str = Field("static", description="how a triton endpoint names its replicas (entry point group "
                           "genie.discovery): static (host:port, or several comma-separated) or dns (one "
                           "name:port resolved to every A/AAAA record, e.g. a headless Kubernetes Service)")
    triton_tls_ca_file: Path | None = Field(None, description="PEM CA that signed the model services' certificates: "
                                            "talk to them over TLS (they run with --tls-cert/--tls-key)")
    triton_tls_cert_file: Path | None = Field(None, description="PEM client certificate for model services that "
                                              "require one (--tls-client-ca: mutual TLS), with triton_tls_key_file")
    triton_tls_key_file: Path | None = Field(None, description="PEM private key of triton_tls_cert_file")
    triton_hold_renew_s: float = Field(30.0, gt=0, description="how often this gateway renews its holds on published "
                                       "versions in --catalog services (keep well under their --hold-lease-s, 120)")
    discovery_refresh_s: float = Field(5.0, gt=0, description="how often replicas are discovered again and those "
                                       "found down are probed (also at once after a replica went down)")
    # Published models (services/stores/catalog.py) in the store named by GENIE_STORE_*: served by name at
    # their latest version, which the gateway re-reads every catalog_poll_s, so a new version reaches new worlds
    # without a restart. With backend=triton, each name's services run with --catalog (triton_endpoints).
    catalog_models: list[str] = Field(
        default_factory=list, description='names served from the model catalog, JSON: ["coinrun"] (none: no catalog)')
    catalog_poll_s: float = Field(2.0, gt=0, description="how often the catalog's latest-version pointers are read")


class StoreSettings(BaseSettings):
    """Where datasets, run checkpoints and published models live; env prefix GENIE_STORE_.

    S3 credentials come from GENIE_STORE_S3_ACCESS_KEY / GENIE_STORE_S3_SECRET_KEY or from a secret file
    (GENIE_STORE_S3_CREDENTIALS_FILE, JSON {"access_key": ..., "secret_key": ...}); never from code.
    """

    model_config = SettingsConfigDict(env_prefix="GENIE_STORE_", frozen=True)

    kind: str = Field("local", description="store plugin (entry point group genie.stores): local or s3")
    root: str = Field("out/store", description="directory of the local store")
    s3_endpoint: str = Field("127.0.0.1:9000", description="S3 host:port (MinIO, SeaweedFS, AWS)")
    s3_bucket: str = Field("genie", description="bucket holding datasets/, jobs/ and models/ (created if missing)")
    s3_secure: bool = Field(False, description="use HTTPS")
    s3_region: str | None = Field(None, description="S3 region, if the server needs one")
    s3_access_key: SecretStr | None = Field(None, description="S3 access key (or use the credentials file)")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret key (or use the credentials file)")
    s3_credentials_file: Path | None = Field(None, description='JSON secret file {"access_key":..,"secret_key":..}')
    retry_s: float = Field(60.0, ge=0, description="how long a store call retries an unreachable server")
    cache_dir: str = Field("out/model-cache", description="where loaded model versions are kept locally")


class JobsSettings(ServerSecurity):
    """The training-job API (`genie serve jobs`); env prefix GENIE_JOBS_. Store settings: GENIE_STORE_*."""

    model_config = SettingsConfigDict(env_prefix="GENIE_JOBS_", frozen=True)

    host: str = Field("127.0.0.1", description="address the gRPC and metrics servers bind (0.0.0.0: all interfaces)")
    port: int = Field(50061, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9091, ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="job records, Celery broker and results")
    queue: str = Field("genie-training", description="Celery queue the stages are sent to")
    watch_poll_s: float = Field(0.25, gt=0, description="how often WatchJob looks for changes")
    rpc_threads: int = Field(32, ge=4, description="gRPC worker threads; each open WatchJob holds one")
    shutdown_grace_s: float = Field(5.0, ge=0, description="time in-flight calls get to finish on SIGTERM")
    log_level: str = Field("INFO", description="logging level of the JSON log lines")


class WorkerSettings(BaseSettings):
    """A training worker (`genie worker`); env prefix GENIE_WORKER_. Store settings: GENIE_STORE_*."""

    model_config = SettingsConfigDict(env_prefix="GENIE_WORKER_", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="job records, Celery broker and results")
    queue: str = Field("genie-training", description="Celery queue to consume")
    concurrency: int = Field(1, ge=1, description="stages run at once (each in its own process)")
    scratch_dir: str = Field("out/worker", description="local working copies of data and checkpoints")
    device: str | None = Field(None, description="torch device of the stages (default: cuda if available)")
    visibility_timeout_s: float = Field(
        300.0, gt=0, description="an unacknowledged stage is redelivered after this long (a dead worker's "
        "stage resumes then); a live worker's per-job lease turns the duplicate away")
    lease_s: float = Field(30.0, gt=0, description="a job's lease expires this long after its worker's last heartbeat")
    poll_s: float = Field(0.5, gt=0, description="how often a running stage reports progress, syncs, checks cancel")
    cancel_grace_s: float = Field(5.0, ge=0, description="SIGTERM-to-SIGKILL time of a cancelled stage process")
    max_stage_attempts: int = Field(3, ge=1, description="a stage whose process dies is retried this many times")
    keep_checkpoints: int = Field(2, ge=1, description="run checkpoints kept in the store per stage")
    metrics_port: int = Field(9092, ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one)")
    log_level: str = Field("INFO", description="logging level")
