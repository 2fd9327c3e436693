"""Fixed-length clip sampling from an EpisodeDataset, for the training loop and for evaluation.

Clips are gathered from the memory-mapped shards with one numpy fancy index per shard, never a
Python loop over frames, because this runs between optimizer steps on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from genie_models.data.shards import DatasetError, EpisodeDataset


@dataclass(frozen=True)
class ClipBatch:
    """Clips with their provenance; actions is None for sources without true actions."""

    frames: torch.Tensor  # uint8 [B, T, H, W, 3]
    actions: torch.Tensor | None  # int64 [B, T-1], evaluation only
    episodes: torch.Tensor  # int64 [B], index into dataset.episodes
    starts: torch.Tensor  # int64 [B], first frame of each clip within its episode


class ClipSampler:
    """Draws uniformly over every valid clip of a split: episodes weighted by their number of starts.

    With shard=(rank, world_size) every rank draws the same global batch from the same seed and gathers only
    its contiguous share of rows, so N data-parallel ranks train on exactly the batch one process would.
    """

    def __init__(self, dataset: EpisodeDataset, split: str, clip_length: int, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        self.rank, self.world_size = shard
        self.dataset = dataset
        self.split = split
        self.clip_length = clip_length
        self.episode_indices = np.array(
            [i for i in dataset.split(split) if dataset.episodes[i].length >= clip_length], dtype=np.int64
        )
        if len(self.episode_indices) == 0:
            longest = max((dataset.episodes[i].length for i in dataset.split(split)), default=0)
            raise DatasetError(f"{dataset.root}: no {split!r} episode has {clip_length} frames "
                               f"(longest has {longest}); use shorter clips or longer episodes")
        lengths = np.array([dataset.episodes[i].length for i in self.episode_indices], dtype=np.int64)
        starts_per_episode = lengths - clip_length + 1
        self.episode_probabilities = starts_per_episode / starts_per_episode.sum()
        self._starts_per_episode = starts_per_episode
        self._rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] random clips."""
        return self.sample_batch(batch_size, with_actions=False).frames

    def sample_with_actions(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, T, H, W, 3] clips and the int64 [B, T-1] true actions between their frames."""
        batch = self.sample_batch(batch_size, with_actions=True)
        assert batch.actions is not None
        return batch.frames, batch.actions

    def sample_batch(self, batch_size: int, with_actions: bool = False) -> ClipBatch:
        """Random clips with the episodes and start frames they came from: this rank's share of a global
        batch of batch_size clips."""
        if batch_size % self.world_size:
            raise ValueError(f"a batch of {batch_size} clips does not split evenly over {self.world_size} ranks; "
                             f"use a multiple of {self.world_size}")
        choice = self._rng.choice(len(self.episode_indices), size=batch_size, p=self.episode_probabilities)
        starts = self._rng.integers(0, self._starts_per_episode[choice])
        mine = slice(self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size)
        choice, starts = choice[mine], starts[mine]
        return gather_clips(self.dataset, self.episode_indices[choice], starts, self.clip_length, with_actions)


def gather_clips(
    dataset: EpisodeDataset, episodes: np.ndarray, starts: np.ndarray, clip_length: int,
    with_actions: bool = False,
) -> ClipBatch:
    """Copy clips (episode i, frames starts[i] .. starts[i]+clip_length) out of the shards."""
    size = dataset.frame_size
    frames = np.empty((len(episodes), clip_length, size, size, 3), dtype=np.uint8)
    actions = np.empty((len(episodes), clip_length - 1), dtype=np.int64) if with_actions else None
    records = [dataset.episodes[i] for i in episodes]
    # Row of every clip frame inside its shard: [B, T].
    rows = np.array([r.start for r in records], dtype=np.int64)[:, None] + starts[:, None] + np.arange(clip_length)
    shard_names = np.array([r.shard for r in records])
    for shard in np.unique(shard_names):
        in_shard = shard_names == shard
        frames[in_shard] = dataset.shard(str(shard))[rows[in_shard]]
        if actions is not None:
            actions_shard = records[int(np.flatnonzero(in_shard)[0])].actions_shard
            if actions_shard is None:
                raise DatasetError(f"{dataset.root}: source {dataset.source!r} has no true actions")
            actions[in_shard] = dataset.shard(actions_shard)[rows[in_shard][:, :-1]]
    return ClipBatch(
        frames=torch.from_numpy(frames),
        actions=torch.from_numpy(actions) if actions is not None else None,
        episodes=torch.from_numpy(np.asarray(episodes, dtype=np.int64)),
        starts=torch.from_numpy(np.asarray(starts, dtype=np.int64)),
    )


def iterate_heldout(
    dataset: EpisodeDataset, clip_length: int, max_clips: int, batch_size: int = 16,
    split: str = "heldout", with_actions: bool = False,
) -> Iterator[ClipBatch]:
    """Deterministic evaluation clips: non-overlapping clips, the k-th of every episode before any (k+1)-th.

    Taking clips round-robin across episodes spreads a small max_clips over many levels/videos.
    """
    candidates = [
        (k, episode, k * clip_length)
        for episode in dataset.split(split)
        for k in range(dataset.episodes[episode].length // clip_length)
    ]
    if not candidates:
        raise DatasetError(f"{dataset.root}: no {split!r} episode has {clip_length} frames")
    candidates.sort()
    chosen = candidates[:max_clips]
    for offset in range(0, len(chosen), batch_size):
        part = chosen[offset:offset + batch_size]
        episodes = np.array([episode for _, episode, _ in part], dtype=np.int64)
        starts = np.array([start for _, _, start in part], dtype=np.int64)
        yield gather_clips(dataset, episodes, starts, clip_length, with_actions)
