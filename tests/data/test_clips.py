"""Tests for clip sampling: shapes, contiguity, length weighting, true actions, deterministic held-out clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genie_models.data.clips import ClipSampler, iterate_heldout
from genie_models.data.shards import DatasetError, EpisodeDataset, EpisodeWriter

FRAME_SIZE = 4
# (length, split); episode 0 is too short for the clips below.
EPISODES = [(5, "train"), (30, "train"), (50, "train"), (12, "heldout"), (20, "heldout"), (9, "heldout")]
CLIP = 8


def coded_action(episode: int, t: np.ndarray) -> np.ndarray:
    return (episode * 7 + t) % 15


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> EpisodeDataset:
    """Every frame encodes its own position: red = frame index t, green = episode index."""
    root = tmp_path_factory.mktemp("clips")
    # Small shards so one batch gathers from several shard files.
    with EpisodeWriter(root, source="test", frame_size=FRAME_SIZE, shard_frames=32) as writer:
        for episode, (length, split) in enumerate(EPISODES):
            frames = np.zeros((length, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
            frames[..., 0] = np.arange(length)[:, None, None]
            frames[..., 1] = episode
            writer.add_episode(frames, coded_action(episode, np.arange(length - 1)).astype(np.int16), split)
    opened = EpisodeDataset.open(root)
    assert len({episode.shard for episode in opened.episodes}) >= 3
    return opened


def test_sample_returns_uint8_clips_of_the_requested_shape(dataset: EpisodeDataset) -> None:
    clips = ClipSampler(dataset, "train", CLIP, seed=0).sample(16)
    assert isinstance(clips, torch.Tensor) and clips.dtype == torch.uint8
    assert clips.shape == (16, CLIP, FRAME_SIZE, FRAME_SIZE, 3)


def test_clips_are_contiguous_frames_of_one_train_episode(dataset: EpisodeDataset) -> None:
    batch = ClipSampler(dataset, "train", CLIP, seed=1).sample_batch(64)
    frames = batch.frames.numpy()
    episode_ids = frames[:, :, 0, 0, 1]
    assert np.all(episode_ids == episode_ids[:, :1])
    assert set(episode_ids[:, 0].tolist()) <= set(dataset.split("train")) - {0}
    assert np.all(np.diff(frames[:, :, 0, 0, 0].astype(int), axis=1) == 1)
    for row, (episode, start) in enumerate(zip(batch.episodes.tolist(), batch.starts.tolist())):
        np.testing.assert_array_equal(frames[row], dataset.frames(episode)[start:start + CLIP])


def test_episodes_are_drawn_in_proportion_to_their_clip_starts(dataset: EpisodeDataset) -> None:
    batch = ClipSampler(dataset, "train", CLIP, seed=2).sample_batch(6000)
    counts = np.bincount(batch.episodes.numpy(), minlength=3)
    starts = np.array([0, 30 - CLIP + 1, 50 - CLIP + 1])
    np.testing.assert_allclose(counts / counts.sum(), starts / starts.sum(), atol=0.03)
    # Every valid start, including the last one, is reachable.
    assert batch.starts[batch.episodes == 1].max().item() == 30 - CLIP
    assert batch.starts.min().item() == 0


def test_sample_with_actions_returns_the_actions_between_clip_frames(dataset: EpisodeDataset) -> None:
    frames, actions = ClipSampler(dataset, "heldout", CLIP, seed=3).sample_with_actions(32)
    assert actions.shape == (32, CLIP - 1) and actions.dtype == torch.int64
    t = frames[:, :-1, 0, 0, 0].numpy().astype(np.int64)
    episode = frames[:, :1, 0, 0, 1].numpy().astype(np.int64)
    np.testing.assert_array_equal(actions.numpy(), coded_action(episode, t))


def test_same_seed_gives_the_same_clips(dataset: EpisodeDataset) -> None:
    first = ClipSampler(dataset, "train", CLIP, seed=4).sample(8)
    second = ClipSampler(dataset, "train", CLIP, seed=4).sample(8)
    other = ClipSampler(dataset, "train", CLIP, seed=5).sample(8)
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_ranks_of_a_sharded_sampler_together_draw_the_single_process_batch(dataset: EpisodeDataset) -> None:
    whole = ClipSampler(dataset, "train", CLIP, seed=6)
    ranks = [ClipSampler(dataset, "train", CLIP, seed=6, shard=(rank, 3)) for rank in range(3)]
    for _ in range(2):  # the streams stay aligned from batch to batch
        assert torch.equal(torch.cat([sampler.sample(6) for sampler in ranks]), whole.sample(6))
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        ranks[0].sample(4)


def test_clips_longer_than_every_episode_raise(dataset: EpisodeDataset) -> None:
    with pytest.raises(DatasetError, match="no 'heldout' episode has 21 frames"):
        ClipSampler(dataset, "heldout", 21, seed=0)
    assert ClipSampler(dataset, "heldout", 20, seed=0).sample(2).shape[1] == 20


def test_actions_requested_from_an_actionless_source_raise(tmp_path: Path) -> None:
    with EpisodeWriter(tmp_path, source="video-folder", frame_size=FRAME_SIZE) as writer:
        writer.add_episode(np.zeros((10, FRAME_SIZE, FRAME_SIZE, 3), np.uint8), None, "train")
    sampler = ClipSampler(EpisodeDataset.open(tmp_path), "train", 4, seed=0)
    assert sampler.sample(3).shape == (3, 4, FRAME_SIZE, FRAME_SIZE, 3)
    with pytest.raises(DatasetError, match="no true actions"):
        sampler.sample_with_actions(3)


def test_heldout_iteration_is_deterministic_round_robin_and_non_overlapping(dataset: EpisodeDataset) -> None:
    batches = list(iterate_heldout(dataset, CLIP, max_clips=4, batch_size=3, with_actions=True))
    assert [len(batch.frames) for batch in batches] == [3, 1]
    episodes = torch.cat([batch.episodes for batch in batches]).tolist()
    starts = torch.cat([batch.starts for batch in batches]).tolist()
    # First clip of every held-out episode (3, 4, 5) before a second clip (only 20-frame episode 4 has one).
    assert list(zip(episodes, starts)) == [(3, 0), (4, 0), (5, 0), (4, 8)]
    for batch in batches:
        assert batch.actions is not None and batch.actions.shape == (len(batch.frames), CLIP - 1)
    again = list(iterate_heldout(dataset, CLIP, max_clips=4, batch_size=3))
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(batches, again))


def test_heldout_iteration_stops_when_clips_run_out(dataset: EpisodeDataset) -> None:
    clips = sum(len(batch.frames) for batch in iterate_heldout(dataset, CLIP, max_clips=100))
    assert clips == 12 // CLIP + 20 // CLIP + 9 // CLIP
