"""Tests for the on-disk episode store: round trips, memory mapping, atomic publication, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genie_models.data.shards import DatasetError, EpisodeDataset, EpisodeWriter

FRAME_SIZE = 8


def make_episode(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(length, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    actions = rng.integers(0, 15, size=length - 1).astype(np.int16)
    return frames, actions


def write_dataset(root: Path, lengths: list[int], shard_frames: int = 25) -> list[tuple[np.ndarray, np.ndarray]]:
    episodes = [make_episode(length, seed) for seed, length in enumerate(lengths)]
    with EpisodeWriter(root, source="test", frame_size=FRAME_SIZE, shard_frames=shard_frames) as writer:
        for i, (frames, actions) in enumerate(episodes):
            writer.add_episode(frames, actions, "heldout" if i == 1 else "train")
    return episodes


def test_episodes_round_trip_across_several_shards(tmp_path: Path) -> None:
    written = write_dataset(tmp_path, [10, 20, 7, 30, 2])
    dataset = EpisodeDataset.open(tmp_path)
    assert len({episode.shard for episode in dataset.episodes}) >= 3
    assert dataset.frame_size == FRAME_SIZE and dataset.source == "test"
    assert dataset.num_frames == 69
    for i, (frames, actions) in enumerate(written):
        np.testing.assert_array_equal(dataset.frames(i), frames)
        np.testing.assert_array_equal(dataset.actions(i), actions)
        assert dataset.actions(i).dtype == np.int16
    assert dataset.split("train") == [0, 2, 3, 4] and dataset.split("heldout") == [1]


def test_frames_are_memory_mapped_not_loaded(tmp_path: Path) -> None:
    write_dataset(tmp_path, [10, 20])
    dataset = EpisodeDataset.open(tmp_path)
    frames = dataset.frames(1)
    assert isinstance(frames, np.memmap) and frames.dtype == np.uint8
    assert not frames.flags.writeable


def test_actions_are_stored_in_a_separate_int16_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, [10, 20])
    index = json.loads((tmp_path / "index.json").read_text())
    entry = index["episodes"][0]
    assert entry["actions_shard"] != entry["shard"]
    assert np.load(tmp_path / entry["actions_shard"]).dtype == np.int16


def test_sources_without_actions_return_none(tmp_path: Path) -> None:
    frames, _ = make_episode(5, 0)
    with EpisodeWriter(tmp_path, source="video-folder", frame_size=FRAME_SIZE) as writer:
        writer.add_episode(frames, None, "train")
    dataset = EpisodeDataset.open(tmp_path)
    assert dataset.actions(0) is None
    assert not list(tmp_path.glob("actions-*"))


def test_dataset_is_invisible_until_writer_closes(tmp_path: Path) -> None:
    writer = EpisodeWriter(tmp_path, source="test", frame_size=FRAME_SIZE, shard_frames=5)
    writer.add_episode(*make_episode(6, 0), "train")  # fills and publishes a first shard
    assert list(tmp_path.glob("frames-*.npy"))
    with pytest.raises(DatasetError, match="index.json"):
        EpisodeDataset.open(tmp_path)
    writer.close()
    assert len(EpisodeDataset.open(tmp_path)) == 1


def test_exception_inside_writer_leaves_no_index(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with EpisodeWriter(tmp_path, source="test", frame_size=FRAME_SIZE) as writer:
            writer.add_episode(*make_episode(6, 0), "train")
            raise RuntimeError("generator crashed")
    assert not (tmp_path / "index.json").exists()


def test_writer_refuses_to_overwrite_an_existing_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path, [4])
    with pytest.raises(DatasetError, match="already exists"):
        EpisodeWriter(tmp_path, source="test", frame_size=FRAME_SIZE)


def test_writer_rejects_malformed_episodes(tmp_path: Path) -> None:
    frames, actions = make_episode(6, 0)
    with EpisodeWriter(tmp_path, source="test", frame_size=FRAME_SIZE) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.add_episode(frames.astype(np.float32), actions, "train")
        with pytest.raises(ValueError, match="actions must have shape"):
            writer.add_episode(frames, actions[:-1], "train")
        with pytest.raises(ValueError, match="split"):
            writer.add_episode(frames, actions, "validation")
        with pytest.raises(ValueError, match="at least 2 frames"):
            writer.add_episode(frames[:1], actions[:0], "train")
        writer.add_episode(frames, actions, "train")
        with pytest.raises(ValueError, match="every episode has actions or none"):
            writer.add_episode(frames, None, "train")


def test_missing_shard_error_names_the_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, [10, 20, 7])
    (tmp_path / "frames-00001.npy").unlink()
    with pytest.raises(DatasetError, match="frames-00001.npy"):
        EpisodeDataset.open(tmp_path)


def test_truncated_shard_error_names_the_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, [10, 20, 7])
    shard = tmp_path / "frames-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-FRAME_SIZE * FRAME_SIZE * 3 * 2])
    with pytest.raises(DatasetError, match="frames-00000.npy"):
        EpisodeDataset.open(tmp_path)


def test_shard_shorter_than_index_says_truncated(tmp_path: Path) -> None:
    write_dataset(tmp_path, [10, 20, 7])
    np.save(tmp_path / "frames-00000.npy", np.zeros((3, FRAME_SIZE, FRAME_SIZE, 3), np.uint8))
    with pytest.raises(DatasetError, match="frames-00000.npy.*truncated"):
        EpisodeDataset.open(tmp_path)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else"}), "[]",
                                     json.dumps({"format": "genie-episodes", "version": 1})])
def test_garbled_index_error_names_the_index(tmp_path: Path, content: str) -> None:
    write_dataset(tmp_path, [10])
    (tmp_path / "index.json").write_text(content)
    with pytest.raises(DatasetError, match="index.json"):
        EpisodeDataset.open(tmp_path)


@pytest.mark.parametrize("field, value", [("length", "ten"), ("start", -1), ("split", "validation"),
                                          ("split", None), ("shard", 3), ("shard", "../frames-00000.npy"),
                                          ("colour", "blue")])
def test_bad_episode_entry_in_index_is_reported(tmp_path: Path, field: str, value: object) -> None:
    write_dataset(tmp_path, [10])
    index = json.loads((tmp_path / "index.json").read_text())
    if value is None:
        del index["episodes"][0][field]
    else:
        index["episodes"][0][field] = value
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="bad episode entry"):
        EpisodeDataset.open(tmp_path)


def test_missing_directory_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        EpisodeDataset.open(tmp_path / "nowhere")
