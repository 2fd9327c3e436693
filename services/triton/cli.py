"""`genie serve tokenizer|lam|dynamics` and `python -m services.triton KIND`: one model service's settings and options.

services/cli.py calls register(). Kept free of torch and Triton so `genie --help` is fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from services.triton import protocol

LOOPBACK = "127.0.0.1"
LOOPBACK_ADDRESSES = (LOOPBACK, "::1", "localhost")

DESCRIPTION = ("Serves one part of a trained world as a Triton model service until SIGTERM/SIGINT (exit 0). "
               "Exits with status 1 and one log line when it cannot serve: ports still taken after --port-wait-s, "
               "the world fails to load, or tritonserver dies, so a supervisor (genie serve stack, Kubernetes) "
               "restarts it.")


@dataclass(frozen=True)
class ServiceSettings:
    checkpoint: Path | None  # None with catalog: versions come from the model catalog
    model_name: str
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    address: str = "0.0.0.0"
    workspace_root: Path | None = None  # a fresh workspace is made inside it (default: the temp dir)
    max_worlds: int = 256  # world caches kept; the least recently used is evicted beyond this
    max_batch_size: int = 64
    max_queue_delay_us: int = 500  # how long a step waits for others to join its batch
    device: str = "cpu"
    port_wait_s: float = 15.0  # how long a restart waits for a killed instance's tritonserver to free the ports
    catalog: bool = False  # serve model_name's published versions (store from GENIE_STORE_*), not a checkpoint
    # With catalog: a gateway's hold on a version lapses when not renewed for this long.
    hold_lease_s: float = protocol.HOLD_LEASE_S
    # TLS on the gRPC endpoint (the gateway's); with tls_client_ca also mutual: only clients holding a
    # certificate that CA signed may connect. Triton's HTTP endpoint has no TLS (health and /v2 stay plaintext).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    http_address: str | None = None  # None: see http_bind_address()

    def http_bind_address(self) -> str:
        """Where Triton's plaintext HTTP endpoint (health, and /v2 inference) listens: --http-address when given;
        loopback when gRPC serves TLS, or /v2 would be a way around it (in-container health checks and PyTriton
        itself use loopback; Prometheus scrapes the separate metrics port); else --address."""
        if self.http_address is not None:
            return self.http_address
        return LOOPBACK if self.tls_cert is not None else self.address

    def http_exposed_beside_tls(self) -> bool:
        """Whether plaintext HTTP inference is reachable from other hosts although gRPC requires TLS."""
        return self.tls_cert is not None and self.http_bind_address() not in LOOPBACK_ADDRESSES


OPTION_HELP = {
    "grpc_port": "Triton gRPC port (the gateway's endpoint)", "http_port": "Triton HTTP port (health, /v2)",
    "metrics_port": "Triton Prometheus port (nv_* metrics)",
    "max_worlds": "world caches kept; the least recently used is evicted beyond this",
    "max_batch_size": "most rows Triton's dynamic batcher merges into one execution",
    "max_queue_delay_us": "how long a step waits for others to join its batch",
}


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one model service, shared by `python -m services.triton` and `genie serve KIND`."""
    defaults = ServiceSettings(Path("."), "")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="trained world directory")
    source.add_argument("--catalog", action="store_true",
                        help="serve the published versions of --model-name from the model catalog (store from "
                        "GENIE_STORE_*), each loaded and unloaded at run time when a gateway asks")
    parser.add_argument("--model-name", required=True, help="the world model's name in the gateway (and catalog)")
    for name, help_text in OPTION_HELP.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"{help_text} (default {getattr(defaults, name)})")
    parser.add_argument("--address", default=defaults.address,
                        help="interface every endpoint binds (default %(default)s)")
    parser.add_argument("--workspace-root", type=Path, default=None,
                        help="where the PyTriton workspace is made (default the temp dir; keep it short)")
    parser.add_argument("--device", default=defaults.device,
                        help="torch device: cpu, cuda, cuda:1 (default %(default)s)")
    parser.add_argument("--port-wait-s", type=float, default=defaults.port_wait_s,
                        help="how long to wait for busy ports before exiting with status 1 (default %(default)s)")
    parser.add_argument("--hold-lease-s", type=float, default=defaults.hold_lease_s,
                        help="with --catalog: a gateway's hold on a version lapses when not renewed for this long "
                        "(a dead gateway's versions are unloaded then; gateways renew every "
                        f"{protocol.HOLD_RENEW_S:g} s by default) (default %(default)s)")
    parser.add_argument("--tls-cert", type=Path, default=None,
                        help="PEM certificate (chain) of the gRPC endpoint: serve it over TLS (needs --tls-key)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, default=None,
                        help="PEM CA: with --tls-cert, accept only clients with a certificate it signed (mutual TLS)")
    parser.add_argument("--http-address", default=None,
                        help="interface of Triton's plaintext HTTP endpoint (health, /v2 inference): default "
                        f"--address, but {LOOPBACK} with --tls-cert so plaintext HTTP is no way around TLS")


@dataclass(frozen=True)
class ServerTLS:
    """A service's TLS files, as a launcher (services/triton/stack.py) passes them on its command line."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # mutual TLS

    def arguments(self) -> list[str]:
        extra = [] if self.client_ca_file is None else ["--tls-client-ca", str(self.client_ca_file)]
        return ["--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file), *extra]


def check_settings(settings: ServiceSettings) -> None:
    """Refuse what argparse cannot see by name, before anything starts: a lease that is not positive, half-configured
    TLS, missing files."""
    if settings.hold_lease_s <= 0:
        raise ValueError("--hold-lease-s must be positive (seconds a hold lasts unrenewed), "
                         f"got {settings.hold_lease_s:g}")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both to serve gRPC over TLS, or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for option, path in (("--tls-cert", settings.tls_cert), ("--tls-key", settings.tls_key),
                         ("--tls-client-ca", settings.tls_client_ca)):
        if path is not None and not path.is_file():
            raise ValueError(f"{option} {path}: no such file")


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServiceSettings:
    settings = ServiceSettings(**{field.name: getattr(args, field.name) for field in fields(ServiceSettings)})
    try:
        check_settings(settings)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2 and the usage line
    return settings


def parse_args(argv: Sequence[str] | None) -> tuple[str, ServiceSettings]:
    parser = argparse.ArgumentParser(prog="python -m services.triton", description=DESCRIPTION)
    parser.add_argument("kind", choices=protocol.SERVICE_KINDS)
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    return args.kind, settings_from(args, parser)


def register(serve_sub: argparse._SubParsersAction) -> None:
    for kind in protocol.SERVICE_KINDS:
        service = serve_sub.add_parser(kind, help=f"the {kind} Triton model service", description=DESCRIPTION)
        add_service_arguments(service)
        service.set_defaults(handler=_serve, service_parser=service)


def _serve(args: argparse.Namespace) -> None:
    import logging

    from services.triton.serve import run  # torch and Triton load only now

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args.service, settings_from(args, args.service_parser))
