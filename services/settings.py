"""Typed settings of each service, read once from the environment at start-up and passed down.

Every field can be set with an environment variable `<PREFIX><FIELD>` (e.g. GENIE_GATEWAY_PORT=50051).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """The session gateway (`genie serve gateway`); env prefix GENIE_GATEWAY_."""

    model_config = SettingsConfigDict(env_prefix="GENIE_GATEWAY_", frozen=True)

    host: str = Field("0.0.0.0", description="address the gRPC server binds")
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
    step_deadline_s: float = Field(30.0, gt=0, description="longest a step may take when the call sets no deadline")
    batch_window_ms: float = Field(2.0, ge=0, description="how long a step waits for others to share its batch")
    max_batch: int = Field(64, ge=1, description="most worlds stepped in one backend call")
    max_message_bytes: int = Field(32 * 2**20, ge=2**20, description="gRPC send/receive message size limit")
    rpc_threads: int = Field(128, ge=4, description="gRPC worker threads; each open Play stream holds one")
    shutdown_grace_s: float = Field(10.0, ge=0, description="time in-flight calls get to finish on SIGTERM")
    log_level: str = Field("INFO", description="logging level of the JSON log lines")
    # Used only by backend="triton" (services/backends/triton.py): where each model's three Triton services
    # listen. JSON: {"coinrun": {"tokenizer": "10.0.0.5:8001", "lam": "10.0.0.6:8001", "dynamics": "10.0.0.7:8001"}}
    triton_endpoints: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="model name -> {tokenizer|lam|dynamics: Triton gRPC host:port} (backend=triton only)")
