"""Tests for video-folder ingestion with real files encoded by PyAV (H.264 mp4, VP9 webm) and PIL (gif)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genie_models.data.sample_videos import write_video
from genie_models.data.shards import DatasetError
from genie_models.data.video_folder import ingest_video_folder, resize_square

HEIGHT, WIDTH, NUM_FRAMES, FPS = 96, 128, 40, 20
SQUARE, STEP = 16, 2


def moving_square(num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint8 [T, H, W, 3]: a red square moving right by STEP px per frame over a soft gradient."""
    gradient = np.linspace(40, 120, width, dtype=np.float32)[None, :, None]
    background = np.broadcast_to(gradient, (height, width, 3)).astype(np.uint8)
    frames = np.repeat(background[None], num_frames, axis=0).copy()
    top = (height - SQUARE) // 2
    for t in range(num_frames):
        left = (width - height) // 2 + t * STEP  # stays inside the centered square crop
        frames[t, top:top + SQUARE, left:left + SQUARE] = (230, 30, 30)
    return frames


def encode(path: Path, frames: np.ndarray, codec: str = "libx264", fps: int = FPS) -> Path:
    return write_video(frames, path, fps=fps, codec=codec)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def red_centroid_x(frame: np.ndarray) -> float:
    mask = (frame[..., 0] > 150) & (frame[..., 1] < 100)
    return float(np.nonzero(mask)[1].mean())


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    encode(folder / "square.mp4", moving_square())
    return folder


def test_mp4_frames_match_the_resized_source(square_folder: Path, tmp_path: Path) -> None:
    dataset = ingest_video_folder(square_folder, tmp_path, frame_size=64, heldout_fraction=0.0, progress=False)
    assert dataset.source == "video-folder" and len(dataset) == 1
    frames = dataset.frames(0)
    assert frames.shape == (NUM_FRAMES, 64, 64, 3) and frames.dtype == np.uint8
    assert dataset.actions(0) is None
    expected = np.stack([resize_square(frame, 64) for frame in moving_square()])
    # Measured 45.7 dB; squashing without the crop gives 25.6 dB and a one-frame shift 31.8 dB.
    assert psnr(frames, expected) > 38


def test_square_moves_right_at_the_rescaled_speed(square_folder: Path, tmp_path: Path) -> None:
    frames = ingest_video_folder(square_folder, tmp_path, frame_size=64, heldout_fraction=0.0,
                                 progress=False).frames(0)
    positions = np.array([red_centroid_x(frame) for frame in frames])
    assert np.all(np.diff(positions) > 0)
    # 39 steps of 2 px in a 96 px crop shrunk to 64 px.
    assert abs((positions[-1] - positions[0]) - (NUM_FRAMES - 1) * STEP * 64 / HEIGHT) < 2


def test_fps_and_frame_stride_subsample_the_same_frames(square_folder: Path, tmp_path: Path) -> None:
    by_fps = ingest_video_folder(square_folder, tmp_path / "fps", fps=5, heldout_fraction=0.0, progress=False)
    by_stride = ingest_video_folder(square_folder, tmp_path / "stride", frame_stride=4, heldout_fraction=0.0,
                                    progress=False)
    full = ingest_video_folder(square_folder, tmp_path / "full", heldout_fraction=0.0, progress=False)
    assert by_fps.frames(0).shape[0] == NUM_FRAMES // 4
    np.testing.assert_array_equal(by_fps.frames(0), by_stride.frames(0))
    np.testing.assert_array_equal(by_stride.frames(0), full.frames(0)[::4])


def test_long_videos_are_split_into_bounded_episodes(
    square_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = ingest_video_folder(square_folder, tmp_path / "a", max_episode_frames=16, heldout_fraction=0.0,
                                  progress=False)
    assert [episode.length for episode in dataset.episodes] == [16, 16, 8]
    whole = ingest_video_folder(square_folder, tmp_path / "b", heldout_fraction=0.0, progress=False)
    np.testing.assert_array_equal(dataset.frames(1), whole.frames(0)[16:32])
    with caplog.at_level(logging.WARNING):
        # 40 = 3 * 13 + 1: a 1-frame tail cannot be an episode.
        dropped = ingest_video_folder(square_folder, tmp_path / "c", max_episode_frames=13, heldout_fraction=0.0,
                                      progress=False)
    assert [episode.length for episode in dropped.episodes] == [13, 13, 13]
    assert "square.mp4" in caplog.text


def test_webm_and_gif_are_read_too(tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    small = moving_square(num_frames=8, height=48, width=64)
    encode(folder / "clip.webm", small, codec="libvpx-vp9")
    images = [Image.fromarray(frame) for frame in small]
    images[0].save(folder / "clip.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    dataset = ingest_video_folder(folder, tmp_path / "out", frame_size=32, heldout_fraction=0.0, progress=False)
    assert sorted(episode.name for episode in dataset.episodes) == ["clip.gif#0", "clip.webm#0"]
    for i in range(len(dataset)):
        positions = [red_centroid_x(frame) for frame in dataset.frames(i)]
        assert len(positions) == 8 and np.all(np.diff(positions) > 0)


def test_unreadable_and_non_video_files_are_skipped_with_a_warning(
    square_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "square.mp4").write_bytes((square_folder / "square.mp4").read_bytes())
    (folder / "broken.mp4").write_bytes(b"this is not a video" * 100)
    (folder / "empty.mkv").write_bytes(b"")
    (folder / "notes.txt").write_text("not a video either")
    with caplog.at_level(logging.WARNING):
        dataset = ingest_video_folder(folder, tmp_path / "out", heldout_fraction=0.0, progress=False)
    assert [episode.name for episode in dataset.episodes] == ["square.mp4#0"]
    assert "broken.mp4" in caplog.text and "empty.mkv" in caplog.text


def test_empty_folder_raises_an_actionable_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no video files"):
        ingest_video_folder(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        ingest_video_folder(tmp_path / "missing", tmp_path / "out", progress=False)


def test_folder_without_readable_videos_raises_and_writes_no_index(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.mov").write_bytes(b"\x00" * 4096)
    with pytest.raises(DatasetError, match="could be decoded"):
        ingest_video_folder(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def test_whole_videos_go_to_one_split_deterministically(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(4):
        encode(folder / f"video{i}.mp4", moving_square(num_frames=12, height=32, width=48))
    splits = []
    for run in range(2):
        dataset = ingest_video_folder(folder, tmp_path / f"out{run}", max_episode_frames=5, heldout_fraction=0.25,
                                      seed=3, progress=False)
        by_video: dict[str, set[str]] = {}
        for episode in dataset.episodes:
            by_video.setdefault(episode.name.split("#")[0], set()).add(episode.split)
        assert all(len(video_splits) == 1 for video_splits in by_video.values())
        splits.append({video: video_splits.pop() for video, video_splits in by_video.items()})
    assert splits[0] == splits[1]
    assert sorted(splits[0].values()) == ["heldout", "train", "train", "train"]
