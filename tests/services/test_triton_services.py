"""The Triton model services over real gRPC, and the `triton` backend on top of them.

One stack (three PyTriton processes on loopback) serves the whole module; the crash test runs last and
leaves the dynamics service down.
"""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest

from services.backends.base import ModelUnavailable, WorldsNotCached, WorldStep
from services.backends.triton import TritonBackend
from services.settings import GatewaySettings
from services.triton import protocol
from services.triton.client import ServiceClient, ids_column
from services.triton.protocol import Status
from tests.services.helpers import MODEL_NAME
from tests.services.triton_stack import lone_service, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGE_SIZE, GRID, NUM_ACTIONS, NUM_CODES = 32, 8, 4, 64


@pytest.fixture(scope="module")
def stack(world_checkpoint):
    with running_stack(world_checkpoint, MODEL_NAME, max_worlds=16) as running:
        yield running


@pytest.fixture(scope="module")
def backend(stack):
    triton = TritonBackend(GatewaySettings(**stack.overrides()))
    yield triton
    triton.close()


def client(stack, kind: str) -> ServiceClient:
    return ServiceClient(stack.services[kind].url, kind, 2**25, timeout_s=30.0)


def frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def step_inputs(world_id: str, action: int = 1, step_index: int = 0) -> dict[str, np.ndarray]:
    return {"world_id": ids_column(world_id, rows=True), "action": np.array([[action]], dtype=np.int64),
            "seed": np.array([[7]], dtype=np.int64), "step_index": np.array([[step_index]], dtype=np.int64),
            "num_maskgit_steps": np.array([[4]], dtype=np.int32), "temperature": np.array([[1.0]], dtype=np.float32)}


# Start models take the world's frame index of the history's first frame; these histories start a world.
AT_START = {"first_position": np.array([0], dtype=np.int64)}


def decode_inputs(world_id: str, tokens: np.ndarray, step_index: int = 0) -> dict[str, np.ndarray]:
    return {"world_id": ids_column(world_id, rows=True), "tokens": tokens,
            "step_index": np.array([[step_index]], dtype=np.int64)}


def start_dynamics(dynamics: ServiceClient, world_id: str) -> None:
    history = np.random.default_rng(1).integers(0, NUM_CODES, (2, GRID * GRID))
    dynamics.infer(protocol.DYNAMICS_START, {"world_id": ids_column(world_id, rows=False), "tokens": history,
                                             "actions": np.array([NUM_ACTIONS, 2], dtype=np.int64)} | AT_START)


def metric(stack, kind: str, name: str, model: str) -> float:
    text = urllib.request.urlopen(stack.services[kind].metrics_url, timeout=10).read().decode()
    found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert found, f"{name} of {model} missing from the metrics"
    return float(found.group(1))


def test_encode_start_decode_round_trip_keeps_shapes(stack):
    tokenizer = client(stack, "tokenizer")
    tokens = tokenizer.infer(protocol.TOKENIZER_ENCODE, {"frames": frames(3)}).as_numpy("tokens")
    assert tokens.shape == (3, GRID, GRID) and 0 <= tokens.min() and tokens.max() < NUM_CODES
    history = tokenizer.infer(protocol.TOKENIZER_START, {"world_id": ids_column("round-trip", rows=False),
                                                         "tokens": tokens} | AT_START).as_numpy("frames")
    assert history.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and history.dtype == np.uint8
    decoded = tokenizer.infer(protocol.TOKENIZER_DECODE, decode_inputs("round-trip", tokens[-1:]))
    assert decoded.as_numpy("frames").shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert decoded.as_numpy("status").reshape(-1).tolist() == [Status.OK]


def test_lam_labels_each_transition_with_an_action(stack):
    actions = client(stack, "lam").infer(protocol.LAM_LABEL, {"frames": frames(4)}).as_numpy("actions")
    assert actions.shape == (3,) and all(0 <= action < NUM_ACTIONS for action in actions)


def test_dynamics_step_after_start_gives_tokens_in_range(stack):
    dynamics = client(stack, "dynamics")
    start_dynamics(dynamics, "stepper")
    result = dynamics.infer(protocol.DYNAMICS_STEP, step_inputs("stepper"))
    assert result.as_numpy("status").reshape(-1).tolist() == [Status.OK]
    tokens = result.as_numpy("tokens")
    assert tokens.shape == (1, GRID * GRID) and 0 <= tokens.min() and tokens.max() < NUM_CODES


def test_step_of_unknown_world_answers_not_cached(stack):
    result = client(stack, "dynamics").infer(protocol.DYNAMICS_STEP, step_inputs("never-started"))
    assert result.as_numpy("status").reshape(-1).tolist() == [Status.NOT_CACHED]
    unknown = decode_inputs("never-started", np.zeros((1, GRID, GRID), dtype=np.int64))
    decoded = client(stack, "tokenizer").infer(protocol.TOKENIZER_DECODE, unknown)
    assert decoded.as_numpy("status").reshape(-1).tolist() == [Status.NOT_CACHED]


def test_bad_history_is_refused_with_a_message(stack):
    with pytest.raises(ValueError, match="actions must lie in"):
        client(stack, "dynamics").infer(protocol.DYNAMICS_START, {
            "world_id": ids_column("bad", rows=False), "tokens": np.zeros((2, GRID * GRID), dtype=np.int64),
            "actions": np.array([99, 0], dtype=np.int64)} | AT_START)


def test_concurrent_steps_of_eight_worlds_run_in_fewer_batches(stack):
    dynamics = client(stack, "dynamics")
    worlds = [f"batched-{index}" for index in range(8)]
    for world_id in worlds:
        start_dynamics(dynamics, world_id)
    requests_before = metric(stack, "dynamics", "nv_inference_request_success", protocol.DYNAMICS_STEP)
    batches_before = metric(stack, "dynamics", "nv_inference_exec_count", protocol.DYNAMICS_STEP)
    results = dynamics.infer_many(protocol.DYNAMICS_STEP, [step_inputs(world_id) for world_id in worlds])
    assert [result.as_numpy("status").item() for result in results] == [Status.OK] * 8
    requests = metric(stack, "dynamics", "nv_inference_request_success", protocol.DYNAMICS_STEP) - requests_before
    batches = metric(stack, "dynamics", "nv_inference_exec_count", protocol.DYNAMICS_STEP) - batches_before
    assert requests == 8 and batches < 8, f"8 steps ran in {batches} model executions"


def test_backend_lists_model_and_plays_worlds(stack, backend):
    [info] = backend.models()
    assert (info.name, info.num_actions, info.image_size, info.grid_size) == (MODEL_NAME, NUM_ACTIONS, IMAGE_SIZE, GRID)
    prompt = frames(2, seed=3)
    tokens = backend.encode(MODEL_NAME, prompt)
    actions = np.concatenate([[NUM_ACTIONS], backend.infer_actions(MODEL_NAME, prompt)])
    worlds = [f"played-{index}" for index in range(3)]
    for world_id in worlds:
        assert backend.start_world(MODEL_NAME, world_id, tokens, actions).shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    steps = [WorldStep(world_id, action=index, seed=index, step_index=2, num_maskgit_steps=4, temperature=1.0)
             for index, world_id in enumerate(worlds)]
    results = backend.step_worlds(MODEL_NAME, steps)
    assert [result.frame.shape for result in results] == [(IMAGE_SIZE, IMAGE_SIZE, 3)] * 3
    assert all(result.tokens.shape == (GRID, GRID) for result in results)
    for world_id in worlds:
        backend.end_world(MODEL_NAME, world_id)
    with pytest.raises(WorldsNotCached):
        backend.step_worlds(MODEL_NAME, steps[:1])


def test_backend_step_replays_identically_after_a_rebuild(stack, backend):
    tokens = backend.encode(MODEL_NAME, frames(1, seed=5))
    step = WorldStep("replayed", action=2, seed=11, step_index=1, num_maskgit_steps=4, temperature=1.0)
    outcomes = []
    for _ in range(2):
        backend.start_world(MODEL_NAME, "replayed", tokens, np.array([NUM_ACTIONS]))
        outcomes.append(backend.step_worlds(MODEL_NAME, [step])[0])
    np.testing.assert_array_equal(outcomes[0].tokens, outcomes[1].tokens)
    np.testing.assert_array_equal(outcomes[0].frame, outcomes[1].frame)


def test_backend_refuses_an_out_of_range_action_and_forgets_the_batch(stack, backend):
    tokens = backend.encode(MODEL_NAME, frames(1, seed=6))
    for world_id in ("fine", "wrong"):
        backend.start_world(MODEL_NAME, world_id, tokens, np.array([NUM_ACTIONS]))
    steps = [WorldStep("fine", 1, 0, 1, 4, 1.0), WorldStep("wrong", NUM_ACTIONS + 3, 0, 1, 4, 1.0)]
    with pytest.raises(ValueError, match="refused the steps of worlds \\['wrong'\\]"):
        backend.step_worlds(MODEL_NAME, steps)
    # "fine" may have advanced in the dynamics service alone: it must be rebuilt, not played on.
    with pytest.raises(WorldsNotCached):
        backend.step_worlds(MODEL_NAME, steps[:1])


def test_backend_refuses_a_miswired_endpoint(stack):
    overrides = stack.overrides()
    endpoints = overrides["triton_endpoints"][MODEL_NAME]
    endpoints["tokenizer"] = endpoints["dynamics"]
    miswired = TritonBackend(GatewaySettings(**overrides))
    with pytest.raises(ModelUnavailable, match="check triton_endpoints"):
        miswired.models()
    miswired.close()


def test_two_dynamics_services_run_side_by_side(stack, world_checkpoint, tmp_path):
    second = lone_service("dynamics", world_checkpoint, "second-world", tmp_path, max_worlds=4)
    second.start()
    try:
        second.wait_ready()
        answers = []
        for url in (stack.services["dynamics"].url, second.url):
            query = {"query": np.array([b""], dtype=object)}
            result = ServiceClient(url, "dynamics", 2**25, 30.0).infer(protocol.INFO, query)
            answers.append(protocol.info_from_json(result.as_numpy("info")[0])[0].name)
        assert answers == [MODEL_NAME, "second-world"]
    finally:
        second.stop()


def test_a_step_applied_once_is_refused_when_sent_again(stack):
    dynamics = client(stack, "dynamics")
    start_dynamics(dynamics, "retried")
    first = dynamics.infer(protocol.DYNAMICS_STEP, step_inputs("retried", step_index=2))
    assert first.as_numpy("status").item() == Status.OK
    again = dynamics.infer(protocol.DYNAMICS_STEP, step_inputs("retried", step_index=2))
    assert again.as_numpy("status").item() == Status.NOT_CACHED  # its cache is past step 2 already
    assert dynamics.infer(protocol.DYNAMICS_STEP, step_inputs("retried", step_index=3)).as_numpy("status").item() == 0
    start_dynamics(dynamics, "retried")  # rebuilt from the same history: step 2 replays identically
    replay = dynamics.infer(protocol.DYNAMICS_STEP, step_inputs("retried", step_index=2))
    np.testing.assert_array_equal(replay.as_numpy("tokens"), first.as_numpy("tokens"))
    tokenizer = client(stack, "tokenizer")
    tokens = tokenizer.infer(protocol.TOKENIZER_ENCODE, {"frames": frames(1)}).as_numpy("tokens")
    tokenizer.infer(protocol.TOKENIZER_START, {"world_id": ids_column("retried", rows=False), "tokens": tokens} | AT_START)
    statuses = [tokenizer.infer(protocol.TOKENIZER_DECODE, decode_inputs("retried", tokens, step_index=5))
                .as_numpy("status").item() for _ in range(2)]
    assert statuses == [Status.OK, Status.NOT_CACHED]


def test_batch_that_failed_after_its_dynamics_step_replays_identically(stack, backend):
    """The first half of a batch applied (dynamics stepped) and the second failed: the retry must not play
    from the advanced cache; it is told "not cached", rebuilt from history, and gives the undisturbed frame."""
    tokens = backend.encode(MODEL_NAME, frames(2, seed=12))
    actions = np.array([NUM_ACTIONS, 2])
    for world_id in ("half-applied", "undisturbed"):
        backend.start_world(MODEL_NAME, world_id, tokens, actions)

    def step(world_id: str) -> WorldStep:
        return WorldStep(world_id, action=1, seed=7, step_index=2, num_maskgit_steps=4, temperature=1.0)

    [expected] = backend.step_worlds(MODEL_NAME, [step("undisturbed")])
    client(stack, "dynamics").infer(protocol.DYNAMICS_STEP, step_inputs("half-applied", step_index=2))
    with pytest.raises(WorldsNotCached):
        backend.step_worlds(MODEL_NAME, [step("half-applied")])
    backend.start_world(MODEL_NAME, "half-applied", tokens, actions)  # what the gateway does on WorldsNotCached
    [got] = backend.step_worlds(MODEL_NAME, [step("half-applied")])
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(got.frame, expected.frame)


def test_dynamics_service_crashed_and_restarted_at_once_serves_again_and_worlds_continue_identically(stack, backend):
    """The service process alone is SIGKILLed (its tritonserver lingers on the ports) and started again at
    once: it waits for the ports instead of failing to bind. Then a dead service answers UNAVAILABLE fast."""
    tokens = backend.encode(MODEL_NAME, frames(1, seed=9))
    for world_id in ("survivor", "twin"):
        backend.start_world(MODEL_NAME, world_id, tokens, np.array([NUM_ACTIONS]))
    first = backend.step_worlds(MODEL_NAME, [WorldStep(world_id, 1, 0, 1, 4, 1.0) for world_id in ("survivor", "twin")])
    [expected] = backend.step_worlds(MODEL_NAME, [WorldStep("twin", 3, 0, 2, 4, 1.0)])
    dynamics = stack.services["dynamics"]
    dynamics.process.kill()
    dynamics.process.wait()
    dynamics.start()  # 0 s after the crash; the replacement failed to bind 2 s after one
    dynamics.wait_ready()
    step = WorldStep("survivor", 3, 0, 2, 4, 1.0)
    with pytest.raises(WorldsNotCached) as lost:
        backend.step_worlds(MODEL_NAME, [step])
    assert lost.value.world_ids == ["survivor"]
    history = np.stack([tokens[0], first[0].tokens])
    backend.start_world(MODEL_NAME, "survivor", history, np.array([NUM_ACTIONS, 1]))
    [got] = backend.step_worlds(MODEL_NAME, [step])
    np.testing.assert_array_equal(got.frame, expected.frame)

    dynamics.kill()  # the whole process group, as `genie serve stack` cleans up after a dead service
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="unavailable"):
        backend.step_worlds(MODEL_NAME, [WorldStep("survivor", 0, 0, 3, 4, 1.0)])
    assert time.monotonic() - started < 1.0
