"""Per-world action guidance over real gRPC: SamplingParams.action_guidance is validated, recorded with the world,
and played alike by the in-process and Triton backends (bit for bit); a model without an action pointer refuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.cli import register
from services.gateway.server import GatewayRuntime
from tests.services.conftest import gateway_settings, tiny_world_model
from tests.services.helpers import MODEL_NAME, create_request, open_channel, pixels_of
from tests.services.triton_stack import triton_stack

pytestmark = pytest.mark.integration

GUIDED = "tiny-guided"
ACTIONS = [1, 3, 0, 2, 1]


@pytest.fixture(scope="module")
def guided_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("guided-world")
    tiny_world_model(action_pointer=True).save(directory, step=0)
    return directory


@contextlib.contextmanager
def serving(overrides: dict) -> Iterator[world_pb2_grpc.WorldServiceStub]:
    runtime = GatewayRuntime(gateway_settings(overrides)).start()
    try:
        with contextlib.closing(open_channel(runtime.port)) as channel:
            yield world_pb2_grpc.WorldServiceStub(channel)
    finally:
        runtime.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def guided_gateway(guided_checkpoint) -> Iterator[GatewayRuntime]:
    """A gateway with the in-process backend serving the guided world."""
    runtime = GatewayRuntime(gateway_settings({"backend": "inprocess", "models": {GUIDED: str(guided_checkpoint)}}))
    yield runtime.start()
    runtime.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def guided_stub(guided_gateway) -> Iterator[world_pb2_grpc.WorldServiceStub]:
    with contextlib.closing(open_channel(guided_gateway.port)) as channel:
        yield world_pb2_grpc.WorldServiceStub(channel)


def guided_request(guidance: float | None, seed: int = 4) -> pb.CreateWorldRequest:
    request = create_request(seed=seed, model=GUIDED)
    if guidance is not None:
        request.sampling.action_guidance = guidance
    return request


def play(stub, guidance: float | None) -> tuple[pb.World, list[np.ndarray]]:
    created = stub.CreateWorld(guided_request(guidance))
    world_id = created.world.world_id
    frames = [pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=action)).frame)
              for action in ACTIONS]
    return stub.GetWorld(pb.GetWorldRequest(world_id=world_id)), frames


def test_guidance_is_recorded_and_played_alike_by_both_backends(guided_checkpoint, guided_stub):
    [model] = guided_stub.ListModels(pb.ListModelsRequest()).models
    assert model.has_action_guidance and model.default_action_guidance == 2.0
    played = {("inprocess", guidance): play(guided_stub, guidance) for guidance in (None, 2.0, 0.0, 0.5)}
    with triton_stack(guided_checkpoint, GUIDED) as overrides, serving(overrides) as stub:
        [model] = stub.ListModels(pb.ListModelsRequest()).models
        assert model.has_action_guidance and model.default_action_guidance == 2.0
        for guidance in (None, 0.5):
            played["triton", guidance] = play(stub, guidance)

    for (backend, guidance), (world, _) in played.items():
        assert world.sampling.action_guidance == (2.0 if guidance is None else guidance), (backend, guidance)
    frames = {key: np.stack(value[1]) for key, value in played.items()}
    np.testing.assert_array_equal(frames["inprocess", None], frames["inprocess", 2.0])  # unset: the default
    for guidance in (None, 0.5):
        np.testing.assert_array_equal(frames["triton", guidance], frames["inprocess", guidance])
    assert not np.array_equal(frames["inprocess", 0.0], frames["inprocess", 2.0])  # guidance steers the frames
    assert not np.array_equal(frames["inprocess", 0.5], frames["inprocess", 2.0])


@pytest.mark.parametrize("guidance, message", [
    (-1.0, "action_guidance must be a number from 0 to 100"),
    (math.nan, "action_guidance must be a number from 0 to 100"),
    (101.0, "the model's default is 2"),
])
def test_out_of_range_guidance_is_invalid_argument(guided_stub, guidance, message):
    open_before = len(guided_stub.ListWorlds(pb.ListWorldsRequest()).worlds)
    with pytest.raises(grpc.RpcError) as refused:
        guided_stub.CreateWorld(guided_request(guidance))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    assert len(guided_stub.ListWorlds(pb.ListWorldsRequest()).worlds) == open_before  # nothing was created


def test_a_model_without_an_action_pointer_refuses_guidance_and_says_so(stub):
    [model] = stub.ListModels(pb.ListModelsRequest()).models
    assert model.name == MODEL_NAME and not model.has_action_guidance
    request = create_request()
    request.sampling.action_guidance = 1.0
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateWorld(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no action pointer, so action_guidance does not apply" in refused.value.details()
    world = stub.CreateWorld(create_request()).world  # unset is fine, and reported unset
    assert not world.sampling.HasField("action_guidance")


def genie_client(*arguments: str) -> None:
    """`genie client ...` as parsed by the CLI (its handler is called in this process)."""
    parser = argparse.ArgumentParser(prog="genie")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["client", *arguments])
    args.handler(args)


def client_play(port: int, image: Path, out: Path, *options: str) -> None:
    genie_client("play", "--address", f"127.0.0.1:{port}", "--image", str(image), "--out", str(out), "--seed", "4",
                 "--actions", ",".join(map(str, ACTIONS)), *options)


def test_client_models_lists_what_a_caller_needs_to_create_a_world(guided_gateway, capsys):
    genie_client("models", "--address", f"127.0.0.1:{guided_gateway.port}")
    [model] = json.loads(capsys.readouterr().out)["models"]
    assert model["name"] == GUIDED and model["num_actions"] == 4 and model["image_size"] == 32
    assert model["has_action_guidance"] and model["default_action_guidance"] == 2.0
    assert model["default_num_maskgit_steps"] == 4 and model["versions"] == []
    with pytest.raises(SystemExit) as refused:
        genie_client("models", "--address", f"127.0.0.1:{guided_gateway.port}", "--ca-file", "no-such-ca.pem")
    error = capsys.readouterr().err
    assert refused.value.code == 2 and error.startswith("genie client models: error: ") and "no-such-ca.pem" in error


def test_client_play_sends_its_sampling_options_and_reports_what_the_world_played(guided_gateway, guided_stub,
                                                                                 tmp_path, capsys):
    image = tmp_path / "prompt.png"
    image.write_bytes(guided_request(None).prompt.encoded)
    client_play(guided_gateway.port, image, tmp_path / "guided", "--action-guidance", "0.5")
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == GUIDED and report["frames"] == len(ACTIONS) + 1
    assert report["sampling"]["seed"] == "4" and report["sampling"]["action_guidance"] == 0.5  # protobuf's JSON
    saved = np.stack([np.asarray(Image.open(tmp_path / "guided" / f"frame_{index:03d}.png"))
                      for index in range(1, len(ACTIONS) + 1)])
    np.testing.assert_array_equal(saved, np.stack(play(guided_stub, 0.5)[1]))  # as the API plays guidance 0.5

    client_play(guided_gateway.port, image, tmp_path / "default", "--maskgit-steps", "2", "--temperature", "0.3")
    report = json.loads(capsys.readouterr().out)
    assert report["sampling"] == {"seed": "4", "num_maskgit_steps": 2, "temperature": 0.3, "action_guidance": 2.0}


@pytest.mark.parametrize("options, message", [
    (("--action-guidance", "101"), "genie client play: error: INVALID_ARGUMENT: action_guidance must be a number"),
    (("--model", "no-such-world"), "genie client play: error: NOT_FOUND: no model named 'no-such-world'"),
])
def test_client_play_shows_the_gateways_refusal_in_one_line(guided_gateway, tmp_path, capsys, options, message):
    image = tmp_path / "prompt.png"
    image.write_bytes(guided_request(None).prompt.encoded)
    with pytest.raises(SystemExit) as refused:
        client_play(guided_gateway.port, image, tmp_path / "out", *options)
    assert refused.value.code == 2 and capsys.readouterr().err.strip().startswith(message)
    assert not (tmp_path / "out").exists()


def test_client_play_refuses_bad_options_before_calling(guided_gateway, tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        client_play(guided_gateway.port, tmp_path / "no-such.png", tmp_path / "out")
    error = capsys.readouterr().err
    assert missing.value.code == 2 and error.startswith("genie client play: error: ") and "no-such.png" in error
    for options, message in ((("--actions", "1,x"), "'x' is not an action"),
                             (("--maskgit-steps", "-1"), "'-1' is not a number of passes")):
        with pytest.raises(SystemExit) as refused:
            client_play(guided_gateway.port, tmp_path / "no-such.png", tmp_path / "out", *options)
        assert refused.value.code == 2 and message in capsys.readouterr().err
