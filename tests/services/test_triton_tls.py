"""TLS from the gateway to the Triton model services: real services serving gRPC over mutual TLS, a gateway on the
triton backend holding the CA and a client certificate plays a world; callers without them are refused."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.gateway.server import GatewayRuntime
from services.triton.cli import ServerTLS, parse_args
from services.triton.client import ClientTLS, ServiceDown
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
        options = replace(options_for_tests(workspace_root=Path(workspace)),
                          tls=ServerTLS(files["server.pem"], files["server.key"], files["ca.pem"]),
                          client_tls=client_tls)
        with ServiceStack(world_checkpoint, MODEL_NAME, options, log_dir=Path(log_dir)) as stack:
            yield stack, files


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
