"""The genie.v1 WorldService happy paths over real gRPC: create, step, play, describe, close, health, metrics."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genie.v1 import world_pb2 as pb
from genie_models import World
from genie_models.world_model import WorldModel
from tests.services.helpers import MODEL_NAME, create_request, encoded, open_channel, picture, pixels_of

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("width,height", [(300, 200), (1, 1), (33, 7)])
@pytest.mark.parametrize("source", ["png", "jpeg", "raw"])
def test_create_world_accepts_any_image_size_and_format(stub, source, width, height):
    pixels = picture(width, height)
    if source == "raw":
        prompt = pb.PromptImage(raw=pb.RawImage(rgb=pixels.tobytes(), width=width, height=height))
    else:
        prompt = pb.PromptImage(encoded=encoded(pixels, source.upper()))
    response = stub.CreateWorld(create_request(prompt=prompt))
    assert (response.frame.width, response.frame.height, response.frame.channels) == (32, 32, 3)
    assert len(response.frame.data) == 32 * 32 * 3
    assert response.world.step == 0 and response.world.model == MODEL_NAME


def test_steps_return_model_sized_frames_with_increasing_step_numbers(stub):
    world = stub.CreateWorld(create_request()).world
    steps = [stub.StepWorld(pb.StepWorldRequest(world_id=world.world_id, action=a)) for a in (0, 3, 1)]
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(pixels_of(s.frame).shape == (32, 32, 3) for s in steps)
    assert stub.GetWorld(pb.GetWorldRequest(world_id=world.world_id)).step == 3


def test_png_output_decodes_to_the_same_pixels_as_raw(stub):
    raw_world = stub.CreateWorld(create_request(seed=5)).world
    png_world = stub.CreateWorld(create_request(seed=5, output_format=pb.FRAME_FORMAT_PNG)).world
    raw = stub.StepWorld(pb.StepWorldRequest(world_id=raw_world.world_id, action=2))
    png = stub.StepWorld(pb.StepWorldRequest(world_id=png_world.world_id, action=2))
    assert png.frame.format == pb.FRAME_FORMAT_PNG and png.frame.data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(pixels_of(png.frame), pixels_of(raw.frame))
    per_step = stub.StepWorld(pb.StepWorldRequest(world_id=raw_world.world_id, action=0,
                                                  format=pb.FRAME_FORMAT_PNG))
    assert per_step.frame.format == pb.FRAME_FORMAT_PNG


def _play_frames(stub, seed: int, actions: list[int]) -> list[np.ndarray]:
    world = stub.CreateWorld(create_request(seed=seed)).world
    return [pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=world.world_id, action=a)).frame)
            for a in actions]


def test_same_seed_and_actions_replay_identically_and_other_seeds_differ(stub):
    actions = [0, 1, 2, 3, 0, 1]
    first, twin, other = (_play_frames(stub, seed, actions) for seed in (7, 7, 8))
    for a, b in zip(first, twin):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(first, other))


def test_served_frames_equal_the_library_world(stub, world_checkpoint):
    """The gateway adds serving, not different sampling: genie_models.World gives the same frames."""
    actions, image = [1, 2, 0, 3], picture(40, 30)
    world = World(WorldModel.load(world_checkpoint), seed=11)
    expected = [world.reset(image)] + [world.step(a) for a in actions]
    served = stub.CreateWorld(create_request(seed=11, prompt=pb.PromptImage(encoded=encoded(image, "PNG"))))
    frames = [pixels_of(served.frame)] + [
        pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=served.world.world_id, action=a)).frame)
        for a in actions]
    for got, want in zip(frames, expected):
        np.testing.assert_array_equal(got, want)


def test_play_stream_yields_one_frame_per_action_in_order(stub):
    world = stub.CreateWorld(create_request(seed=3)).world
    requests = [pb.PlayRequest(world_id=world.world_id, action=a) for a in (0, 1, 2, 3, 2)]
    responses = list(stub.Play(iter(requests)))
    assert [r.step for r in responses] == [1, 2, 3, 4, 5]
    assert all(r.world_id == world.world_id and pixels_of(r.frame).shape == (32, 32, 3) for r in responses)
    stepped = _play_frames(stub, 3, [0, 1, 2, 3, 2])  # a Play stream samples exactly what StepWorld does
    for response, frame in zip(responses, stepped):
        np.testing.assert_array_equal(pixels_of(response.frame), frame)


def test_list_get_and_close_track_open_worlds(stub):
    ids = {stub.CreateWorld(create_request(seed=s)).world.world_id for s in range(3)}
    assert ids <= {w.world_id for w in stub.ListWorlds(pb.ListWorldsRequest()).worlds}
    closing = ids.pop()
    stub.CloseWorld(pb.CloseWorldRequest(world_id=closing))
    listed = {w.world_id for w in stub.ListWorlds(pb.ListWorldsRequest()).worlds}
    assert closing not in listed and ids <= listed
    with pytest.raises(grpc.RpcError) as error:
        stub.GetWorld(pb.GetWorldRequest(world_id=closing))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_models_describes_actions_size_and_defaults(stub):
    (model,) = stub.ListModels(pb.ListModelsRequest()).models
    assert (model.name, model.num_actions, model.image_size) == (MODEL_NAME, 4, 32)
    assert model.default_num_maskgit_steps == 4 and model.default_temperature == pytest.approx(1.0)


def test_health_check_reports_serving(gateway):
    with open_channel(gateway.port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "genie.v1.WorldService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint_exposes_gateway_metrics(stub, gateway):
    world = stub.CreateWorld(create_request()).world
    stub.StepWorld(pb.StepWorldRequest(world_id=world.world_id, action=0))
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_server.port}/metrics").read().decode()
    for name in ("genie_active_worlds", "genie_steps_total", "genie_step_latency_seconds_bucket",
                 "genie_rpc_errors_total", "genie_batch_size_bucket"):
        assert name in text
    assert f'genie_steps_total{{model="{MODEL_NAME}"}}' in text
