"""Tests for CoinRun generation: frame/action format, level-disjoint splits, determinism, action alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("procgen", reason="CoinRun generation needs procgen-mirror (the 'coinrun' extra)")

from genie_models.data.coinrun import NUM_ACTIONS, generate_coinrun  # noqa: E402
from genie_models.data.shards import EpisodeDataset  # noqa: E402

STEPS = 24


@pytest.fixture(scope="module")
def coinrun(tmp_path_factory: pytest.TempPathFactory) -> EpisodeDataset:
    root = tmp_path_factory.mktemp("coinrun")
    return generate_coinrun(root, num_episodes=8, steps_per_episode=STEPS, heldout_fraction=0.25, seed=7,
                            start_level=100, progress=False)


def test_episodes_are_uint8_frames_with_one_action_per_transition(coinrun: EpisodeDataset) -> None:
    assert len(coinrun) == 8 and coinrun.source == "coinrun" and coinrun.frame_size == 64
    for i in range(len(coinrun)):
        frames, actions = coinrun.frames(i), coinrun.actions(i)
        assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3)
        assert 2 <= len(frames) <= STEPS + 1
        assert actions is not None and actions.shape == (len(frames) - 1,)
        assert actions.min() >= 0 and actions.max() < NUM_ACTIONS
        # Real observations: the scene changes within an episode and is not blank.
        assert frames.std() > 10 and np.any(frames[0] != frames[-1])


def test_random_policy_uses_many_different_actions(coinrun: EpisodeDataset) -> None:
    all_actions = np.concatenate([coinrun.actions(i) for i in range(len(coinrun))])
    assert len(np.unique(all_actions)) >= 12


def test_heldout_levels_are_distinct_from_train_levels(coinrun: EpisodeDataset) -> None:
    heldout, train = coinrun.split("heldout"), coinrun.split("train")
    assert len(heldout) == 2 and len(train) == 6
    levels = [coinrun.episodes[i].name for i in range(len(coinrun))]
    assert len(set(levels)) == len(levels)
    assert {levels[i] for i in heldout}.isdisjoint(levels[i] for i in train)
    # Different levels look different: first frames are not all the same picture.
    first_frames = {coinrun.frames(i)[0].tobytes() for i in range(len(coinrun))}
    assert len(first_frames) == len(coinrun)


def test_generation_is_deterministic_for_a_seed(coinrun: EpisodeDataset, tmp_path: Path) -> None:
    again = generate_coinrun(tmp_path / "again", num_episodes=8, steps_per_episode=STEPS, heldout_fraction=0.25,
                             seed=7, start_level=100, progress=False)
    assert [e.split for e in again.episodes] == [e.split for e in coinrun.episodes]
    for i in range(len(coinrun)):
        np.testing.assert_array_equal(again.frames(i), coinrun.frames(i))
        np.testing.assert_array_equal(again.actions(i), coinrun.actions(i))


def test_a_different_seed_gives_different_actions(coinrun: EpisodeDataset, tmp_path: Path) -> None:
    other = generate_coinrun(tmp_path / "other", num_episodes=2, steps_per_episode=STEPS, heldout_fraction=0.0,
                             seed=8, start_level=100, progress=False)
    assert not np.array_equal(other.actions(0), coinrun.actions(0)[: len(other.actions(0))])


def test_recorded_actions_replay_to_the_recorded_frames_without_crossing_a_reset(coinrun: EpisodeDataset) -> None:
    """actions[t] must be the action that led from frame t to t+1, all inside one level's episode."""
    from procgen import ProcgenGym3Env

    for i, episode in enumerate(coinrun.episodes):
        level = int(episode.name.removeprefix("level-"))
        env = ProcgenGym3Env(num=1, env_name="coinrun", distribution_mode="hard", start_level=level, num_levels=1)
        replayed = [env.observe()[1]["rgb"][0].copy()]
        for action in coinrun.actions(i):
            env.act(np.array([action], dtype=np.int32))
            _, observation, first = env.observe()
            assert not first[0], f"episode {i} recorded a frame after its level ended"
            replayed.append(observation["rgb"][0].copy())
        np.testing.assert_array_equal(np.stack(replayed), coinrun.frames(i))


def test_episode_stops_exactly_where_its_level_ends(tmp_path: Path) -> None:
    """Level 87 with seed 0 ends after 49 random actions: nothing after the end is recorded."""
    from procgen import ProcgenGym3Env

    dataset = generate_coinrun(tmp_path, num_episodes=1, steps_per_episode=100, heldout_fraction=0.0, seed=0,
                               start_level=87, progress=False)
    assert 2 <= len(dataset.frames(0)) < 101
    env = ProcgenGym3Env(num=1, env_name="coinrun", distribution_mode="hard", start_level=87, num_levels=1)
    for action in dataset.actions(0):
        env.act(np.array([action], dtype=np.int32))
        assert not env.observe()[2][0]
    # From the last recorded frame some action must end the level, else the episode stopped too early.
    last_state = env.get_state()
    ended = []
    for action in range(NUM_ACTIONS):
        env.set_state(last_state)
        env.act(np.array([action], dtype=np.int32))
        ended.append(bool(env.observe()[2][0]))
    assert any(ended)
