"""Bad input gets a precise status code and a message a person can act on, never a crash.

Each case names the request field at fault and checks the exact code plus a message substring.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from genie.v1 import world_pb2 as pb
from tests.services.helpers import MAX_WORLDS, create_request, encoded, png_prompt

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _status(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call(request)
    return error.value.code(), error.value.details()


def _raw(rgb: bytes, width: int, height: int) -> pb.PromptImage:
    return pb.PromptImage(raw=pb.RawImage(rgb=rgb, width=width, height=height))


BAD_PROMPTS = {
    "garbage bytes": (pb.PromptImage(encoded=b"definitely not an image"), INVALID, "not a readable image"),
    "truncated png": (pb.PromptImage(encoded=encoded(np.zeros((64, 64, 3), np.uint8), "PNG")[:60]), INVALID,
                      "decoded"),
    "empty bytes": (pb.PromptImage(encoded=b""), INVALID, "0 bytes"),
    "zero-size raw": (_raw(b"", 0, 5), INVALID, "empty (0x5)"),
    "too many bytes": (pb.PromptImage(encoded=b"\0" * (2**20 + 1)), INVALID, "limit of 1048576 bytes"),
    "too many pixels png": (pb.PromptImage(encoded=encoded(np.zeros((1001, 1000, 3), np.uint8), "PNG")), INVALID,
                            "limit of 1000000 pixels"),
    "too many pixels raw": (_raw(b"\0" * 3, 2000, 1000), INVALID, "limit of 1000000 pixels"),
    "raw length mismatch": (_raw(b"\0" * 100, 10, 10), INVALID, "width*height*3 = 10*10*3 = 300"),
    "no prompt": (pb.PromptImage(), INVALID, "needs a prompt image"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt_is_rejected_with_invalid_argument(stub, case):
    prompt, code, message = BAD_PROMPTS[case]
    got_code, details = _status(stub.CreateWorld, create_request(prompt=prompt))
    assert got_code == code and message in details, details


def test_unknown_model_returns_not_found_naming_the_models(stub):
    code, details = _status(stub.CreateWorld, create_request(model="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND and "no model named 'no-such-model'" in details and "tiny-test" in details


def test_negative_temperature_returns_invalid_argument(stub):
    request = create_request()
    request.sampling.temperature = -1.0
    code, details = _status(stub.CreateWorld, request)
    assert code == INVALID and "temperature must be" in details


@pytest.mark.parametrize("action", [-1, 4, 1000])
def test_step_with_action_out_of_range_returns_invalid_argument(stub, action):
    world = stub.CreateWorld(create_request()).world
    code, details = _status(stub.StepWorld, pb.StepWorldRequest(world_id=world.world_id, action=action))
    assert code == INVALID and f"action {action} is out of range" in details and "0..3" in details
    assert stub.StepWorld(pb.StepWorldRequest(world_id=world.world_id, action=3)).step == 1


def test_step_with_unknown_world_returns_not_found(stub):
    code, details = _status(stub.StepWorld, pb.StepWorldRequest(world_id="nope", action=0))
    assert code == grpc.StatusCode.NOT_FOUND and "no open world with id 'nope'" in details


def test_closed_world_returns_not_found_for_every_call(stub):
    world_id = stub.CreateWorld(create_request()).world.world_id
    stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))
    for call, request in ((stub.StepWorld, pb.StepWorldRequest(world_id=world_id, action=0)),
                          (stub.GetWorld, pb.GetWorldRequest(world_id=world_id)),
                          (stub.CloseWorld, pb.CloseWorldRequest(world_id=world_id))):
        assert _status(call, request)[0] == grpc.StatusCode.NOT_FOUND


def test_too_many_worlds_returns_resource_exhausted(stub):
    open_now = len(stub.ListWorlds(pb.ListWorldsRequest()).worlds)
    for _ in range(MAX_WORLDS - open_now):
        stub.CreateWorld(create_request(prompt=png_prompt(4, 4)))
    code, details = _status(stub.CreateWorld, create_request())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"maximum of {MAX_WORLDS} worlds" in details
    stub.CloseWorld(pb.CloseWorldRequest(world_id=stub.ListWorlds(pb.ListWorldsRequest()).worlds[0].world_id))
    assert stub.CreateWorld(create_request()).world.step == 0  # closing frees room again


def test_play_without_world_id_returns_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Play(iter([pb.PlayRequest(action=0)])))
    assert error.value.code() == INVALID and "must set world_id" in error.value.details()


def test_expired_deadline_returns_deadline_exceeded_and_world_keeps_working(stub):
    world_id = stub.CreateWorld(create_request()).world.world_id
    with pytest.raises(grpc.RpcError) as error:
        stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=0), timeout=0.0005)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=1))
    assert after.step == stub.GetWorld(pb.GetWorldRequest(world_id=world_id)).step >= 1


def test_errors_are_counted_by_method_and_code(stub, gateway):
    errors = gateway.metrics.rpc_errors.labels("StepWorld", "NOT_FOUND")
    before = errors._value.get()
    _status(stub.StepWorld, pb.StepWorldRequest(world_id="missing", action=0))
    assert errors._value.get() == before + 1


LONG = "w" * 2**20  # a 1 MB id: once echoed whole into the status, it overflowed gRPC's metadata limit


@pytest.mark.parametrize("method,request_", [
    ("GetWorld", pb.GetWorldRequest(world_id=LONG)),
    ("StepWorld", pb.StepWorldRequest(world_id=LONG, action=0)),
    ("CloseWorld", pb.CloseWorldRequest(world_id=LONG)),
    ("CreateWorld", create_request(model="m" * 2**20)),
])
def test_oversized_ids_and_names_return_invalid_argument_quoting_at_most_100_characters(stub, method, request_):
    code, details = _status(getattr(stub, method), request_)
    assert code == INVALID and "characters long; at most" in details and "(1048576 characters)" in details
    assert len(details) < 300


def test_oversized_world_id_in_a_play_stream_returns_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Play(iter([pb.PlayRequest(world_id=LONG, action=0)])))
    assert error.value.code() == INVALID and len(error.value.details()) < 300


def test_unknown_model_message_quotes_a_long_name_cut_short(stub):
    code, details = _status(stub.CreateWorld, create_request(model="x" * 120))
    assert code == grpc.StatusCode.NOT_FOUND and "x" * 100 + "'..." in details and "x" * 101 not in details
