"""Per-world action guidance over real gRPC: SamplingParams.action_guidance is validated, recorded with the world,
and played alike by the in-process and Triton backends (bit for bit); a model without an action pointer refuses it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
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
def guided_stub(guided_checkpoint) -> Iterator[world_pb2_grpc.WorldServiceStub]:
    """A gateway with the in-process backend serving the guided world."""
    with serving({"backend": "inprocess", "models": {GUIDED: str(guided_checkpoint)}}) as stub:
        yield stub


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
