"""deploy/tls/make-dev-certs.sh and the images' TLS health check: the certificates chain to the CA with the usages
each side needs, keys stay out of git, and genie-healthcheck (deploy/docker/healthcheck.py) passes a real TLS
handshake with them against a gRPC server built by the services' own credentials code, over loopback as in a
container, and fails without the CA, with another CA, or without the client certificate mutual TLS asks for."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from services.auth import add_port, server_credentials
from tests.deploy.helpers import DEPLOY, ROOT, extended_key_usages, run, subject_names

HEALTHCHECK = DEPLOY / "docker/healthcheck.py"
SERVERS = ("gateway", "jobs", "model-service")


@pytest.mark.parametrize("profile", ["compose", "k8s"])
def test_every_certificate_chains_to_the_ca_with_the_usage_its_holder_needs(dev_certificates, profile):
    folder = dev_certificates[profile]
    for name in (*SERVERS, "gateway-client"):
        verified = run("openssl", "verify", "-CAfile", str(folder / "ca.pem"), str(folder / f"{name}.pem"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    for name in SERVERS:
        assert "TLS Web Server Authentication" in extended_key_usages(folder / f"{name}.pem")
    # The model services' liveness probe presents the pod's own certificate to its mutual-TLS port.
    assert "TLS Web Client Authentication" in extended_key_usages(folder / "model-service.pem")
    assert "TLS Web Client Authentication" in extended_key_usages(folder / "gateway-client.pem")
    assert not subject_names(folder / "gateway-client.pem"), "a client certificate names no host"


def test_kubernetes_certificates_name_each_service_in_its_namespace(dev_certificates):
    names = subject_names(dev_certificates["k8s"] / "model-service.pem")
    for service in ("genie-tokenizer", "genie-lam", "genie-dynamics", "genie-dynamics-replicas"):
        assert {service, f"{service}.genie.svc", f"{service}.genie.svc.cluster.local"} <= names
    assert "genie-gateway.genie.svc" in subject_names(dev_certificates["k8s"] / "gateway.pem")


def test_the_default_output_folder_is_git_ignored():
    for folder in ("deploy/secrets/tls", "deploy/secrets/tls-k8s"):
        assert subprocess.run(["git", "check-ignore", "-q", f"{folder}/ca.key"], cwd=ROOT).returncode == 0


@contextlib.contextmanager
def health_server(folder: Path, name: str, mutual: bool):
    """A gRPC health service on loopback with `name`'s certificate (services/auth.py builds the credentials)."""
    security = SimpleNamespace(tls_cert_file=folder / f"{name}.pem", tls_key_file=folder / f"{name}.key",
                               tls_client_ca_file=folder / "ca.pem" if mutual else None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = add_port(server, "127.0.0.1:0", server_credentials(security))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def healthcheck(*args: object) -> int:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "grpc", *map(str, args)], capture_output=True,
                          timeout=60).returncode


def test_the_health_check_speaks_tls_with_the_ca_and_fails_without_it(dev_certificates):
    folder, other_ca = dev_certificates["compose"], dev_certificates["k8s"] / "ca.pem"
    with health_server(folder, "gateway", mutual=False) as address:
        assert healthcheck(address, "--ca", folder / "ca.pem") == 0
        assert healthcheck(address) == 1  # plaintext against a TLS port
        assert healthcheck(address, "--ca", other_ca) == 1  # a CA that did not sign it


def test_the_health_check_presents_a_client_certificate_to_mutual_tls(dev_certificates):
    folder = dev_certificates["compose"]
    with health_server(folder, "model-service", mutual=True) as address:
        assert healthcheck(address, "--ca", folder / "ca.pem") == 1
        assert healthcheck(address, "--ca", folder / "ca.pem", "--cert", folder / "model-service.pem",
                           "--key", folder / "model-service.key") == 0
    assert healthcheck("127.0.0.1:1", "--cert", folder / "model-service.pem") == 2  # a usage error, by name
