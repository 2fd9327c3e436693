"""Ingest a folder of ordinary video files (mp4, webm, mkv, avi, mov, gif) into the episode store.

Frames are decoded with PyAV, optionally subsampled in time, center-cropped to square and resized.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from genie_models.data.shards import DatasetError, EpisodeDataset, EpisodeWriter

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif"})


def ingest_video_folder(
    src_dir: str | os.PathLike[str],
    root: str | os.PathLike[str],
    frame_size: int = 64,
    fps: float | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    frame_stride: int = 1,
    max_episode_frames: int = 1000,
) -> EpisodeDataset:
    """Decode every video under src_dir (recursively) into episodes without actions.

    Subsample either to `fps` frames per second or by keeping every `frame_stride`-th frame. A
    video is wholly train or wholly held out; long ones become episodes of at most
    max_episode_frames frames.
    """
    if fps is not None and frame_stride != 1:
        raise ValueError("pass either fps or frame_stride, not both")
    if frame_stride < 1 or (fps is not None and fps <= 0) or max_episode_frames < 2:
        raise ValueError("frame_stride must be >= 1, fps > 0 and max_episode_frames >= 2")
    videos = find_videos(src_dir)
    heldout = _heldout_videos(videos, heldout_fraction, seed)
    metadata = {"src_dir": str(src_dir), "fps": fps, "frame_stride": frame_stride, "seed": seed}
    writer = EpisodeWriter(root, source="video-folder", frame_size=frame_size, metadata=metadata)
    relative = {path: path.relative_to(src_dir).as_posix() for path in videos}
    for path in tqdm(videos, desc="videos", disable=not progress):
        split = "heldout" if path in heldout else "train"
        for part, frames in enumerate(_read_episodes(path, frame_size, fps, frame_stride, max_episode_frames)):
            writer.add_episode(frames, None, split, name=f"{relative[path]}#{part}")
    if not writer.episodes:
        raise DatasetError(f"none of the {len(videos)} video files in {src_dir} could be decoded into "
                           f">= 2 frames (see the warnings above); check the files with ffprobe")
    writer.close()
    return EpisodeDataset.open(root)


def find_videos(src_dir: str | os.PathLike[str]) -> list[Path]:
    """Video files under src_dir by suffix, sorted so ingestion is deterministic."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise DatasetError(f"video folder {src_dir} does not exist or is not a directory")
    videos = sorted(p for p in src_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise DatasetError(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) found under {src_dir}; "
                           f"put videos there or point --src at the right folder")
    return videos


def _read_episodes(
    path: Path, frame_size: int, fps: float | None, frame_stride: int, max_episode_frames: int
) -> Iterator[np.ndarray]:
    """Chunks of one video's frames; an unreadable video yields what decoded before the error."""
    chunk: list[np.ndarray] = []
    try:
        for frame in _decode(path, fps, frame_stride):
            chunk.append(resize_square(frame, frame_size))
            if len(chunk) == max_episode_frames:
                yield np.stack(chunk)
                chunk = []
    except (av.error.FFmpegError, OSError, ValueError) as error:
        # Skipping one bad file beats losing a whole ingestion run; the warning names it.
        logger.warning("skipping unreadable video %s (after %d frames of its last episode): %s",
                       path, len(chunk), error)
        return
    if len(chunk) >= 2:
        yield np.stack(chunk)
    elif chunk:
        logger.warning("dropping the last %d frame(s) of %s: an episode needs at least 2", len(chunk), path)


def _decode(path: Path, fps: float | None, frame_stride: int) -> Iterator[np.ndarray]:
    """uint8 [H, W, 3] RGB frames of the first video stream, subsampled."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last_tick = -1
        for index, frame in enumerate(container.decode(stream)):
            if fps is not None:
                # Keep the first frame inside each 1/fps interval of presentation time.
                time = frame.time if frame.time is not None else index / float(stream.average_rate or 30)
                tick = int(np.floor(time * fps + 1e-6))
                if tick <= last_tick:
                    continue
                last_tick = tick
            elif index % frame_stride:
                continue
            yield frame.to_ndarray(format="rgb24")


def resize_square(frame: np.ndarray, frame_size: int) -> np.ndarray:
    """Center-crop a uint8 [H, W, 3] frame to a square and resize it to [frame_size, frame_size, 3]."""
    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(frame[top:top + side, left:left + side])
    # PIL's BILINEAR widens its filter when shrinking, so downscaling is antialiased.
    return np.asarray(square.resize((frame_size, frame_size), Image.Resampling.BILINEAR))


def _heldout_videos(videos: list[Path], heldout_fraction: float, seed: int) -> set[Path]:
    """A seeded choice of whole videos to hold out: at least one when the fraction is > 0 and there are 2+."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    count = round(len(videos) * heldout_fraction)
    if heldout_fraction > 0 and len(videos) >= 2:
        count = min(len(videos) - 1, max(1, count))
    order = np.random.default_rng(seed).permutation(len(videos))
    return {videos[int(i)] for i in order[:count]}
