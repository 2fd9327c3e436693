"""Steps are exactly-once from the client's view: expected_step makes a retry safe, a wrong one is
refused with the world's current step, and a step that failed in the backend never half-applies."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from genie.v1 import world_pb2 as pb
from services.backends.inprocess import InProcessBackend
from services.gateway.gateway import Gateway, SamplingRequest
from services.metrics import GatewayMetrics
from services.settings import GatewaySettings
from services.worldstore.memory import MemoryWorldStore
from tests.services.helpers import MODEL_NAME, create_request, picture, pixels_of


def _step(stub, world_id: str, action: int, expected: int | None = None) -> pb.StepWorldResponse:
    request = pb.StepWorldRequest(world_id=world_id, action=action)
    if expected is not None:
        request.expected_step = expected
    return stub.StepWorld(request)


@pytest.mark.integration
def test_retried_step_returns_the_same_frame_without_stepping_again(stub):
    world_id = stub.CreateWorld(create_request(seed=3)).world.world_id
    first = _step(stub, world_id, 2, expected=1)
    retry = _step(stub, world_id, 2, expected=1)
    assert retry.step == first.step == 1 and retry.frame.data == first.frame.data
    assert stub.GetWorld(pb.GetWorldRequest(world_id=world_id)).step == 1
    assert _step(stub, world_id, 0, expected=2).step == 2


@pytest.mark.integration
def test_retried_step_matches_an_unretried_twin(stub):
    retried, twin = (stub.CreateWorld(create_request(seed=4)).world.world_id for _ in range(2))
    for index, action in enumerate([1, 3, 0], start=1):
        _step(stub, retried, action, expected=index)
        again = _step(stub, retried, action, expected=index)  # the answer got lost; the client retries
        np.testing.assert_array_equal(pixels_of(again.frame), pixels_of(_step(stub, twin, action).frame))


@pytest.mark.integration
@pytest.mark.parametrize("expected,action", [(5, 0), (0, 0), (1, 3)])
def test_wrong_expected_step_returns_failed_precondition_naming_the_current_step(stub, expected, action):
    world_id = stub.CreateWorld(create_request()).world.world_id
    _step(stub, world_id, 0)
    with pytest.raises(grpc.RpcError) as error:
        _step(stub, world_id, action, expected=expected)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is at step 1" in error.value.details() and "expected_step 2" in error.value.details()
    assert stub.GetWorld(pb.GetWorldRequest(world_id=world_id)).step == 1


@pytest.mark.integration
def test_play_stream_with_expected_steps_skips_a_replayed_message(stub):
    world_id = stub.CreateWorld(create_request(seed=6)).world.world_id
    requests = [pb.PlayRequest(world_id=world_id, action=a, expected_step=n) for n, a in ((1, 1), (1, 1), (2, 0))]
    responses = list(stub.Play(iter(requests)))
    assert [r.step for r in responses] == [1, 1, 2] and responses[0].frame.data == responses[1].frame.data


@pytest.mark.integration
def test_list_models_reports_window_and_history_frames(stub):
    model = stub.ListModels(pb.ListModelsRequest()).models[0]
    # The tiny test model: window 4 frames; 2 dynamics layers and a 1-layer tokenizer widen the
    # receptive field beyond the window.
    assert model.name == MODEL_NAME and model.window_frames == 4 and model.history_frames > model.window_frames


class _FailsAfterStepping:
    """A real in-process backend whose next step_worlds call steps the worlds, then fails as a service
    dying mid-batch would: the model caches have advanced, the gateway got no frames."""

    def __init__(self, backend: InProcessBackend):
        self.backend, self.fail_next = backend, False

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step_worlds(self, model, steps):
        results = self.backend.step_worlds(model, steps)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the dynamics service died after stepping")
        return results


def test_a_step_that_failed_after_the_backend_advanced_leaves_the_world_as_before(world_checkpoint):
    settings = GatewaySettings(models={"m": str(world_checkpoint)}, auth="none", batch_window_ms=0)
    backend = _FailsAfterStepping(InProcessBackend(settings))
    gateway = Gateway(settings, backend, GatewayMetrics(), MemoryWorldStore())
    try:
        failing, _ = gateway.create_world("me", "m", picture(8, 8), SamplingRequest(seed=9))
        twin, _ = gateway.create_world("me", "m", picture(8, 8), SamplingRequest(seed=9))
        gateway.step_world("me", failing.world_id, 1)
        gateway.step_world("me", twin.world_id, 1)
        backend.fail_next = True
        with pytest.raises(ConnectionError):
            gateway.step_world("me", failing.world_id, 2, expected_step=2)
        assert gateway.get_world("me", failing.world_id).step == 1  # nothing was applied
        for expected, action in ((2, 2), (3, 0)):  # the retry steps from the committed state, like the twin
            got = gateway.step_world("me", failing.world_id, action, expected_step=expected)
            want = gateway.step_world("me", twin.world_id, action)
            assert got.step == want.step == expected
            np.testing.assert_array_equal(got.pixels, want.pixels)
    finally:
        gateway.close()
