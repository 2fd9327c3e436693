"""Playable worlds: any prompt size, determinism per seed, batched worlds joining and leaving, and flat
memory/time over thousands of steps; plus the world checkpoint round trip and tamper refusal."""

import statistics
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from genie_models.checkpoints import CheckpointError
from genie_models.dynamics import DynamicsModel
from genie_models.lam import LatentActionModel
from genie_models.tokenizer import VideoTokenizer
from genie_models.world import World, WorldPool, prepare_prompt
from genie_models.world_model import WorldModel, dynamics_config_for


@pytest.fixture
def world_model(tokenizer_config, lam_config, dynamics_config) -> WorldModel:
    dynamics = dynamics_config_for(tokenizer_config, lam_config, dynamics_config)
    return WorldModel(VideoTokenizer(tokenizer_config), LatentActionModel(lam_config), DynamicsModel(dynamics)).eval()


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_prompts_of_any_size_are_resized_to_the_model():
    assert prepare_prompt(_image(300, 200), 16).shape == (1, 16, 16, 3)
    assert prepare_prompt(_image(1, 1), 16).shape == (1, 16, 16, 3)
    assert prepare_prompt([_image(10, 30), _image(40, 40)], 16).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="empty"):
        prepare_prompt(np.zeros((0, 5, 3), dtype=np.uint8), 16)


def test_world_steps_return_frames_and_are_deterministic_per_seed(world_model):
    def play(seed):
        world = World(world_model, seed=seed)
        first = world.reset(_image(50, 70))
        return [first] + [world.step(action) for action in (0, 1, 2, 3, 1)]

    a, b, c = play(5), play(5), play(6)
    assert a[1].shape == (16, 16, 3) and a[1].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a[1:], c[1:]))


def test_out_of_range_action_is_refused(world_model):
    world = World(world_model)
    world.reset(_image(16, 16))
    with pytest.raises(ValueError, match="out of range"):
        world.step(world_model.num_actions)


def test_worlds_join_and_leave_a_batch_without_changing_each_other(world_model):
    solo = World(world_model, seed=1)
    solo.reset(_image(16, 16, seed=1))
    expected = [solo.step(a) for a in (1, 2, 3)]
    pool = WorldPool(world_model, max_worlds=3)
    other, _ = pool.create(_image(16, 16, seed=2), seed=9)
    mine, _ = pool.create(_image(16, 16, seed=1), seed=1)
    got = [pool.step({mine: 1, other: 0})[mine]]
    pool.close(other)
    late, _ = pool.create(_image(16, 16, seed=3), seed=4)
    got.append(pool.step({mine: 2, late: 3})[mine])
    got.append(pool.step({mine: 3})[mine])
    for frame, reference in zip(got, expected):
        # Batched matmuls may round differently; frames must agree to within a grey level on average.
        assert np.abs(frame.astype(int) - reference.astype(int)).mean() < 1.0


def test_pool_refuses_worlds_beyond_capacity(world_model):
    pool = WorldPool(world_model, max_worlds=1)
    pool.create(_image(16, 16))
    with pytest.raises(RuntimeError, match="maximum"):
        pool.create(_image(16, 16))


def test_thousands_of_steps_keep_memory_and_step_time_flat(world_model):
    aged, fresh = World(world_model, seed=0, num_maskgit_steps=1), World(world_model, seed=1, num_maskgit_steps=1)
    for world in (aged, fresh):
        world.reset(_image(16, 16))
    cache = aged.pool.dynamics.sessions.cache
    size = cache.nbytes() + aged.pool.decoder.sessions.cache.nbytes()
    for step in range(1200):
        aged.step(step % world_model.num_actions)

    def timed(world, count=20):
        start = time.perf_counter()
        for step in range(count):
            world.step(step % world_model.num_actions)
        return (time.perf_counter() - start) / count

    # The two worlds in turn, so that the machine's own changes of speed (minutes long on a shared VM) hit both.
    early, late = zip(*[(timed(fresh), timed(aged)) for _ in range(5)])
    assert int(cache.next_position[0]) == 1301  # the prompt frame + 1300 steps
    assert cache.nbytes() + aged.pool.decoder.sessions.cache.nbytes() == size
    early, late = statistics.median(early), statistics.median(late)
    assert late < early * 1.5, f"step time grew from {early * 1e3:.2f} ms to {late * 1e3:.2f} ms"


def test_world_checkpoint_round_trip_and_tamper_refusal(world_model, tmp_path):
    world_model.save(tmp_path / "world", step=3)
    loaded = WorldModel.load(tmp_path / "world")
    frames = torch.randint(0, 256, (1, 2, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(loaded.tokenizer.encode(frames), world_model.tokenizer.encode(frames))
    path = tmp_path / "world" / "dynamics.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="dynamics.safetensors"):
        WorldModel.load(tmp_path / "world")


def test_a_per_frame_tokenizer_decodes_each_step_without_a_cache(tokenizer_config, lam_config, dynamics_config):
    from dataclasses import replace

    from genie_models.world import rollout
    per_frame = replace(tokenizer_config, context_frames=1)
    dynamics = dynamics_config_for(per_frame, lam_config, dynamics_config)
    model = WorldModel(VideoTokenizer(per_frame), LatentActionModel(lam_config), DynamicsModel(dynamics)).eval()
    played = rollout(model, np.stack([_image(16, 16, seed) for seed in (0, 1)]), torch.tensor([[0, 1, 2], [3, 2, 1]]))
    assert played.frames.shape == (2, 3, 16, 16, 3) and played.tokens.shape == (2, 3, 4, 4)
    # Each generated frame is exactly its tokens decoded alone: no hidden temporal state in the decoder.
    alone = model.tokenizer.decode(torch.from_numpy(played.tokens)).numpy()
    np.testing.assert_array_equal(played.frames, alone)
    pool = WorldPool(model, max_worlds=1)
    world_id, _ = pool.create(_image(16, 16))
    assert pool.decoder.sessions.cache is None and world_id in pool.decoder.sessions
    pool.close(world_id)
    assert world_id not in pool.decoder.sessions


def test_a_rebuild_from_the_last_frames_at_their_positions_continues_bit_identically(world_model):
    from genie_models.stepping import DynamicsEngine, StepRequest
    engine = DynamicsEngine(world_model.dynamics, max_sessions=2)
    config = world_model.dynamics.config
    history = world_model.history_frames()
    tokens = torch.randint(0, config.num_codes, (history + 7, config.tokens_per_frame))
    actions = torch.randint(0, config.num_actions, (history + 7,))
    actions[0] = config.no_action_id
    engine.start("long", tokens, actions)  # the whole life of the world
    window = slice(len(tokens) - history, len(tokens))
    engine.start("rebuilt", tokens[window], actions[window], first_position=window.start)
    request = [StepRequest(name, 1, seed=3, step_index=len(tokens), num_steps=4, temperature=1.0)
               for name in ("long", "rebuilt")]
    for _ in range(3):
        stepped = engine.step(request)
        assert torch.equal(stepped[0], stepped[1])


def test_each_world_plays_its_own_sampling_and_bad_settings_are_refused(world_model, tokenizer_config, lam_config,
                                                                        dynamics_config):
    torch.manual_seed(0)
    pointer = replace(dynamics_config, copy_window=(1, 1), action_pointer=True, action_guidance=2.0)
    guided = WorldModel(VideoTokenizer(tokenizer_config), LatentActionModel(lam_config),
                        DynamicsModel(dynamics_config_for(tokenizer_config, lam_config, pointer))).eval()
    torch.nn.init.normal_(guided.dynamics.action_pointer.weight, std=0.5)  # a trained table is not zero
    actions = (1, 2, 3, 1, 0, 2)

    def play(**sampling) -> np.ndarray:
        world = World(guided, seed=3, **sampling)
        world.reset(_image(16, 16))
        return np.stack([world.step(action) for action in actions])

    default, weak = play(), play(action_guidance=0.0)
    np.testing.assert_array_equal(default, play(action_guidance=2.0))  # unset: the world's own
    pool = WorldPool(guided, max_worlds=2)
    ids = [pool.create(_image(16, 16), seed=3)[0], pool.create(_image(16, 16), seed=3, action_guidance=0.0)[0]]
    steps = [pool.step({world_id: action for world_id in ids}) for action in actions]
    batched = [np.stack([step[world_id] for step in steps]) for world_id in ids]
    for frames, alone, other in zip(batched, (default, weak), (weak, default)):  # each as it plays alone
        error = np.abs(frames.astype(int) - alone.astype(int)).mean()
        assert error < 1.0 < np.abs(frames.astype(int) - other.astype(int)).mean()
    with pytest.raises(ValueError, match="no action pointer"):
        World(world_model, action_guidance=1.0).reset(_image(16, 16))
    for bad, message in (({"action_guidance": -1.0}, "action guidance must be"),
                         ({"action_guidance": float("nan")}, "action guidance must be"),
                         ({"temperature": float("inf")}, "temperature must be"),
                         ({"num_maskgit_steps": -2}, "num_maskgit_steps must be")):
        with pytest.raises(ValueError, match=message):
            World(guided, **bad).reset(_image(16, 16))
