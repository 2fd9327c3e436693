"""TLS from the gateway to the Triton model services: real services serving gRPC over mutual TLS, a gateway on the
triton backend holding the CA and a client certificate plays a world; callers without them are refused. The
services bind every interface, as in a container: their plaintext HTTP stays on loopback, and the liveness probe
(services/triton/probe.py) answers over TLS."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.gateway.server import GatewayRuntime
from services.backends.triton import tls_for_endpoint
from services.triton.cli import ServerTLS, ServiceSettings, parse_args
from services.triton.client import ClientTLS, ServiceClient, ServiceDown
from services.triton.serve import log_http_endpoint
from services.triton.stack import ServiceStack
from tests.services.conftest import gateway_settings
from tests.services.helpers import MODEL_NAME, certificates, create_request, open_channel, pixels_of
from tests.services.triton_stack import options_for_tests


@pytest.fixture(scope="module")
def tls_stack(world_checkpoint, tmp_path_factory):
    files = certificates(tmp_path_factory.mktemp("tls"))
    client_tls = ClientTLS(files["ca.pem"], files["client.pem"], files["client.key"])
    with tempfile.TemporaryDirectory(prefix="genie-ws-") as workspace, \
            tempfile.TemporaryDirectory(prefix="genie-tls-") as log_dir:
        # Every interface, as in a container: only TLS stands between other hosts and gRPC.
        options = replace(options_for_tests(workspace_root=Path(workspace)), address="0.0.0.0",
                          tls=ServerTLS(files["server.pem"], files["server.key"], files["ca.pem"]),
                          client_tls=client_tls)
        with ServiceStack(world_checkpoint, MODEL_NAME, options, log_dir=Path(log_dir)) as stack:
            yield stack, files


def other_local_address() -> str:
    """An address of this machine that is not 127.0.0.1, to dial as another host would: the interface of the route
    out when there is one, else 127.0.0.2 (this machine too, but not the loopback address a service binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("198.51.100.1", 9))  # TEST-NET-2; a UDP connect sends nothing, it only picks the route
            address = udp.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    return "127.0.0.2" if address.startswith("127.") else address


def accepts(address: str, port: int) -> bool:
    """Whether a TCP connection to address:port is accepted."""
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=3):
        return True
    return False


def play(overrides: dict, steps: int = 3) -> list[np.ndarray]:
    runtime = GatewayRuntime(gateway_settings(overrides)).start()
    try:
        with contextlib.closing(open_channel(runtime.port)) as channel:
            stub = world_pb2_grpc.WorldServiceStub(channel)
            created = stub.CreateWorld(create_request(seed=7), timeout=60)
            frames = [pixels_of(created.frame)]
            for action in range(steps):
                frames.append(pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=created.world.world_id,
                                                                           action=action), timeout=60).frame))
            return frames
    finally:
        runtime.stop(grace_s=1.0)


def test_gateway_plays_a_world_over_mutual_tls_to_the_model_services(tls_stack):
    stack, _ = tls_stack
    overrides = stack.overrides()
    assert overrides["triton_tls_ca_file"] and overrides["triton_tls_cert_file"]
    frames = play(overrides)
    assert len(frames) == 4 and all(frame.shape == frames[0].shape and frame.dtype == np.uint8 for frame in frames)


def test_model_services_refuse_plaintext_and_clients_without_a_certificate(tls_stack):
    stack, files = tls_stack
    url = stack.services["dynamics"].url
    for options in ({}, {"ssl": True, "root_certificates": str(files["ca.pem"])}):  # plaintext; TLS, no client cert
        with contextlib.closing(grpcclient.InferenceServerClient(url, **options)) as client:
            with pytest.raises(InferenceServerException):
                client.is_server_ready(client_timeout=5)
    with contextlib.closing(grpcclient.InferenceServerClient(url, **ClientTLS(
            files["ca.pem"], files["client.pem"], files["client.key"]).client_options())) as client:
        assert client.is_server_ready(client_timeout=5)


def test_a_gateway_without_the_client_certificate_cannot_reach_the_services(tls_stack):
    stack, _ = tls_stack
    overrides = stack.overrides()
    del overrides["triton_tls_cert_file"], overrides["triton_tls_key_file"]
    with pytest.raises(ServiceDown, match="service at 127.0.0.1:[0-9]+ is unavailable"):  # it does not start
        play(overrides, steps=0)


def test_half_configured_tls_is_refused_by_name(tls_stack, tmp_path):
    stack, files = tls_stack
    with pytest.raises(ValueError, match="triton_tls_cert_file and triton_tls_key_file go together"):
        ClientTLS(files["ca.pem"], files["client.pem"])
    with pytest.raises(ValueError, match="no such file"):
        ClientTLS(tmp_path / "missing-ca.pem")


@pytest.mark.parametrize("extra, message", [
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "--tls-cert missing.pem: no such file")])
def test_a_model_service_refuses_half_configured_tls_before_starting(extra, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["lam", "--checkpoint", "world", "--model-name", MODEL_NAME, *extra])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_model_service_refuses_a_lease_that_is_not_positive(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["dynamics", "--catalog", "--model-name", MODEL_NAME, "--hold-lease-s", "0"])
    assert exited.value.code == 2 and "--hold-lease-s must be positive" in capsys.readouterr().err


def test_http_of_a_tls_service_listens_on_loopback_only(tls_stack):
    stack, _ = tls_stack
    service = stack.services["dynamics"]
    other = other_local_address()
    # The control: gRPC (TLS) and metrics (Prometheus) answer on that address, so a refusal below is the HTTP bind's.
    assert accepts(other, service.ports.grpc) and accepts(other, service.ports.metrics)
    assert not accepts(other, service.ports.http), f"plaintext HTTP inference is open on {other} beside TLS gRPC"
    with urllib.request.urlopen(f"http://127.0.0.1:{service.ports.http}/v2/health/ready", timeout=5) as answer:
        assert answer.status == 200  # the in-container health check (deploy/docker/healthcheck.py) still works
    assert f"plaintext HTTP (health, /v2 inference) on 127.0.0.1:{service.ports.http} only (gRPC serves TLS)" in \
        service.log_path.read_text()


def probe(port: int, *tls: str) -> int:
    """The Kubernetes liveness probe's exit status (deploy/k8s/components/tls gives it the pod's certificate)."""
    return subprocess.run([sys.executable, "-m", "services.triton.probe", "--grpc-port", str(port), "--timeout-s", "5",
                           *tls], capture_output=True, timeout=60).returncode


def test_liveness_probe_answers_over_mutual_tls_and_fails_without_a_certificate(tls_stack):
    stack, files = tls_stack
    port = stack.services["lam"].ports.grpc
    assert probe(port, "--tls-ca", str(files["ca.pem"]), "--tls-cert", str(files["client.pem"]),
                 "--tls-key", str(files["client.key"])) == 0
    assert probe(port) == 1  # plaintext against a TLS port
    assert probe(port, "--tls-ca", str(files["ca.pem"])) == 1  # TLS, but no client certificate


def test_a_client_verifies_the_service_name_it_is_given_not_the_address_it_dials(tls_stack):
    """dns discovery dials each replica's IP; the gateway then verifies the certificate against the Service name."""
    stack, files = tls_stack
    url = stack.services["tokenizer"].url  # 127.0.0.1:PORT; the certificate names localhost and 127.0.0.1
    for server_name, ready in (("localhost", True), ("not-the-service", False)):
        tls = replace(ClientTLS(files["ca.pem"], files["client.pem"], files["client.key"]), server_name=server_name)
        client = ServiceClient(url, "tokenizer", 2**20, 5.0, tls)
        try:
            assert client.ready(timeout_s=5) is ready, server_name
        finally:
            client.close()


def dns_overrides(stack: ServiceStack, host: str) -> dict:
    """Gateway settings reaching the stack through dns discovery of `host`, one name:port per service."""
    endpoints = {kind: f"{host}:{service.ports.grpc}" for kind, service in stack.services.items()}
    return stack.overrides() | {"discovery": "dns", "triton_endpoints": {MODEL_NAME: endpoints}}


def test_a_gateway_on_dns_discovery_verifies_the_endpoint_name_not_the_address_it_dials(tls_stack, monkeypatch):
    stack, _ = tls_stack
    resolve = socket.getaddrinfo

    def loopback_names(host, port, *args, **kwargs):  # both names are this machine; the certificate has only localhost
        return resolve("127.0.0.1" if host in ("localhost", "genie-unnamed") else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_names)
    assert len(play(dns_overrides(stack, "localhost"), steps=1)) == 2  # dials 127.0.0.1, verifies localhost
    with pytest.raises(ServiceDown):  # the same address under a name the certificate lacks: refused
        play(dns_overrides(stack, "genie-unnamed"), steps=0)


def test_the_gateway_verifies_a_discovered_name_and_addresses_as_written(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    tls = ClientTLS(ca)
    assert tls_for_endpoint(tls, "genie-dynamics-replicas:8001").server_name == "genie-dynamics-replicas"
    assert tls_for_endpoint(tls, "10.0.0.7:8001").server_name is None
    assert tls_for_endpoint(tls, "[fd00::7]:8001").server_name is None
    assert tls_for_endpoint(tls, "dynamics-0:8001,dynamics-1:8001").server_name is None  # each dialled as written
    assert tls_for_endpoint(None, "dynamics:8001") is None


def test_http_address_defaults_to_loopback_with_tls_and_an_explicit_one_is_warned_about(tmp_path, caplog):
    cert = tmp_path / "server.pem"
    plain = ServiceSettings(Path("world"), MODEL_NAME)
    with_tls = replace(plain, tls_cert=cert, tls_key=cert)
    assert plain.http_bind_address() == "0.0.0.0" and with_tls.http_bind_address() == "127.0.0.1"
    opened = replace(with_tls, http_address="0.0.0.0")
    assert opened.http_bind_address() == "0.0.0.0" and opened.http_exposed_beside_tls()
    with caplog.at_level(logging.INFO, logger="genie.triton"):
        log_http_endpoint(opened)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "reachable from other hosts although gRPC requires TLS" in caplog.records[0].getMessage()
    _, parsed = parse_args(["lam", "--checkpoint", "world", "--model-name", MODEL_NAME, "--http-address", "10.0.0.5"])
    assert parsed.http_bind_address() == "10.0.0.5"
