"""Callers are known: API keys (hashed), worlds owned by their key, scopes, per-key quotas, open health
and reflection, keys never logged; and TLS with client certificates (mTLS) for the gateway server."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.auth import hash_key
from services.gateway.server import GatewayRuntime
from services.settings import GatewaySettings
from tests.services.conftest import gateway_settings
from tests.services.helpers import MODEL_NAME, bearer, certificates, create_request, failure, open_channel

pytestmark = pytest.mark.integration

ALICE, BOB, READER = "alice-key-0123456789", "bob-key-9876543210", "reader-key-5555555555"
CAROL = "carol-key-3141592653"  # the quota test's own key: other tests spend no part of its quota


@pytest.fixture(scope="module")
def secured(world_checkpoint, tmp_path_factory):
    """A gateway with API keys from a secret file (bob's stored as a hash), 2 worlds and 0.5 steps/s per key."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# name key [scopes]\nalice {ALICE}\nbob sha256:{hash_key(BOB)}\nreader {READER} read\ncarol {CAROL}\n")
    settings = gateway_settings({"models": {MODEL_NAME: str(world_checkpoint)}, "auth": "api-key",
                                 "api_keys_file": keys, "max_worlds_per_key": 2, "steps_per_second_per_key": 0.5})
    runtime = GatewayRuntime(settings).start()
    channel = open_channel(runtime.port)
    yield runtime, world_pb2_grpc.WorldServiceStub(channel), channel
    channel.close()
    runtime.stop(grace_s=0)


def test_calls_without_a_known_key_are_unauthenticated_and_never_echo_the_key(secured):
    _, stub, _ = secured
    assert failure(stub.ListModels, pb.ListModelsRequest())[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = failure(stub.ListWorlds, pb.ListWorldsRequest(), [("x-api-key", "guessed-key-42")])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "guessed-key-42" not in details
    assert stub.ListModels(pb.ListModelsRequest(), metadata=[("x-api-key", ALICE)]).models[0].name == MODEL_NAME


def test_a_world_is_invisible_to_other_keys(secured):
    _, stub, _ = secured
    world_id = stub.CreateWorld(create_request(), metadata=bearer(ALICE)).world.world_id
    for call, request in ((stub.GetWorld, pb.GetWorldRequest(world_id=world_id)),
                          (stub.StepWorld, pb.StepWorldRequest(world_id=world_id, action=0)),
                          (stub.CloseWorld, pb.CloseWorldRequest(world_id=world_id))):
        assert failure(call, request, bearer(BOB))[0] == grpc.StatusCode.NOT_FOUND
    assert [w.world_id for w in stub.ListWorlds(pb.ListWorldsRequest(), metadata=bearer(ALICE)).worlds] == [world_id]
    assert stub.ListWorlds(pb.ListWorldsRequest(), metadata=bearer(BOB)).worlds == []
    assert stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=1), metadata=bearer(ALICE)).step == 1
    stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id), metadata=bearer(ALICE))


def test_a_read_only_key_may_list_but_not_play(secured):
    _, stub, _ = secured
    assert stub.ListWorlds(pb.ListWorldsRequest(), metadata=bearer(READER)).worlds == []
    code, details = failure(stub.CreateWorld, create_request(), bearer(READER))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'reader' may not play" in details


def test_per_key_quotas_answer_resource_exhausted(secured):
    _, stub, _ = secured
    worlds = [stub.CreateWorld(create_request(), metadata=bearer(CAROL)).world.world_id for _ in range(2)]
    code, details = failure(stub.CreateWorld, create_request(), bearer(CAROL))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 2 open worlds" in details
    stub.CreateWorld(create_request(), metadata=bearer(ALICE))  # another key's quota is its own
    codes = []
    for _ in range(3):  # a burst beyond 0.5 steps/s (bursts of 1)
        try:
            stub.StepWorld(pb.StepWorldRequest(world_id=worlds[0], action=0), metadata=bearer(CAROL))
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and codes[0] == grpc.StatusCode.OK
    for world_id in worlds:
        stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id), metadata=bearer(CAROL))


def test_health_and_reflection_need_no_key(secured):
    _, _, channel = secured
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "genie.v1.WorldService" in {s.name for s in answer.list_services_response.service}


def test_keys_never_appear_in_logs(secured, caplog):
    _, stub, _ = secured
    with caplog.at_level(logging.DEBUG):
        world_id = stub.CreateWorld(create_request(), metadata=bearer(ALICE)).world.world_id
        stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id), metadata=bearer(ALICE))
        failure(stub.ListWorlds, pb.ListWorldsRequest(), bearer("wrong-" + ALICE))
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert "world created" in logged and ALICE not in logged and BOB not in logged


def test_gateway_with_auth_on_and_no_keys_refuses_to_start(world_checkpoint):
    with pytest.raises(ValueError, match="no API keys are configured"):
        GatewayRuntime(GatewaySettings(models={MODEL_NAME: str(world_checkpoint)}, port=0, metrics_port=0,
                                       auth="api-key"))


def test_tls_gateway_serves_clients_with_a_certificate_and_refuses_others(world_checkpoint, tmp_path):
    certs = certificates(tmp_path)
    settings = gateway_settings({"models": {MODEL_NAME: str(world_checkpoint)}, "tls_cert_file": certs["server.pem"],
                                 "tls_key_file": certs["server.key"], "tls_client_ca_file": certs["ca.pem"]})
    runtime = GatewayRuntime(settings).start()
    address = f"localhost:{runtime.port}"
    try:
        with_cert = grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes(), certs["client.key"].read_bytes(),
                                                 certs["client.pem"].read_bytes())
        with grpc.secure_channel(address, with_cert) as channel:
            models = world_pb2_grpc.WorldServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert models.models[0].name == MODEL_NAME
        without_cert = grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes())
        for channel in (grpc.secure_channel(address, without_cert), grpc.insecure_channel(address)):
            with channel, pytest.raises(grpc.RpcError) as error:
                world_pb2_grpc.WorldServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        runtime.stop(grace_s=0)


def test_a_rotated_certificate_reaches_new_connections_without_a_restart(world_checkpoint, tmp_path):
    """The certificate files are replaced in place (as cert-manager renews them): new connections get the new one,
    a connection opened before keeps working."""
    old, new = certificates(mkdir(tmp_path / "old")), certificates(mkdir(tmp_path / "new"))  # two different CAs
    served = mkdir(tmp_path / "served")

    def install(certs: dict[str, Path]) -> None:
        for name in ("server.pem", "server.key"):  # each file replaced at once, as a renamed-over file is
            shutil.copy(certs[name], served / f".{name}.tmp")
            os.replace(served / f".{name}.tmp", served / name)

    install(old)
    settings = gateway_settings({"models": {MODEL_NAME: str(world_checkpoint)}, "tls_cert_file": served / "server.pem",
                                 "tls_key_file": served / "server.key"})
    runtime = GatewayRuntime(settings).start()
    address = f"localhost:{runtime.port}"

    def list_models(channel: grpc.Channel) -> str | grpc.StatusCode:
        try:
            [model] = world_pb2_grpc.WorldServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
            return model.name
        except grpc.RpcError as error:
            return error.code()

    def trusting(certs: dict[str, Path]) -> grpc.Channel:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes()))

    try:
        with trusting(old) as before:
            assert list_models(before) == MODEL_NAME
            with trusting(new) as channel:
                assert list_models(channel) == grpc.StatusCode.UNAVAILABLE
            install(new)
            with trusting(new) as channel:
                assert list_models(channel) == MODEL_NAME
            with trusting(old) as channel:
                assert list_models(channel) == grpc.StatusCode.UNAVAILABLE
            assert list_models(before) == MODEL_NAME  # its connection was made with the old certificate
            (served / "server.pem").unlink()  # mid-rotation: a file missing keeps the certificate read before
            with trusting(new) as channel:
                assert list_models(channel) == MODEL_NAME
    finally:
        runtime.stop(grace_s=0)


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path
