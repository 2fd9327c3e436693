"""On-disk episode store: memory-mappable uint8 frame shards plus a small JSON index.

Every data source (CoinRun, video folders) writes this format, and training reads only this format.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import numpy as np

INDEX_NAME = "index.json"
FORMAT_NAME = "genie-episodes"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
# No action led out of an episode's last frame; the padded slot keeps actions row-aligned with frames.
NO_ACTION = -1
DEFAULT_SHARD_FRAMES = 4096  # ~50 MB per shard at 64x64: few files, still cheap to rewrite


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or inconsistent; the message names the path."""


@dataclass(frozen=True)
class Episode:
    """Where one episode lives: rows start..start+length of a frame shard (and its actions shard)."""

    shard: str
    start: int
    length: int
    split: str
    actions_shard: str | None = None
    name: str = ""


class EpisodeWriter:
    """Appends episodes into shards; a shard appears atomically once full, index.json on close().

    Until close() has written index.json the directory is not a dataset, so readers never see half
    of one. Actions are stored in a parallel int16 shard, padded with NO_ACTION after each episode's
    last frame so an episode's rows are the same in both shards.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        source: str,
        frame_size: int,
        shard_frames: int = DEFAULT_SHARD_FRAMES,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if frame_size < 1 or shard_frames < 1:
            raise ValueError(f"frame_size and shard_frames must be >= 1, got {frame_size}, {shard_frames}")
        self.root = Path(root)
        if (self.root / INDEX_NAME).exists():
            raise DatasetError(f"{self.root / INDEX_NAME} already exists: refusing to overwrite a dataset")
        self.root.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.frame_size = frame_size
        self.shard_frames = shard_frames
        self.metadata = dict(metadata or {})
        self.episodes: list[Episode] = []
        self._frames: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._buffered = 0
        self._shard_index = 0
        self._has_actions: bool | None = None
        self._closed = False

    def add_episode(
        self, frames: np.ndarray, actions: np.ndarray | None, split: str, name: str = ""
    ) -> Episode:
        """Buffer one episode; actions[t] (length T-1) is the action taken between frames t and t+1."""
        self._check_episode(frames, actions, split)
        if self._has_actions is None:
            self._has_actions = actions is not None
        elif self._has_actions != (actions is not None):
            raise ValueError("either every episode has actions or none does")
        episode = Episode(
            shard=self._shard_name("frames"),
            start=self._buffered,
            length=len(frames),
            split=split,
            actions_shard=self._shard_name("actions") if actions is not None else None,
            name=name,
        )
        self._frames.append(np.ascontiguousarray(frames))
        if actions is not None:
            padded = np.full(len(frames), NO_ACTION, dtype=np.int16)
            padded[:-1] = actions
            self._actions.append(padded)
        self._buffered += len(frames)
        self.episodes.append(episode)
        if self._buffered >= self.shard_frames:
            self._flush()
        return episode

    def close(self) -> None:
        """Write the last shard, then index.json (last, atomically) to publish the dataset."""
        if self._closed:
            return
        self._flush()
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source": self.source,
            "frame_size": self.frame_size,
            "num_frames": sum(episode.length for episode in self.episodes),
            "metadata": self.metadata,
            "episodes": [asdict(episode) for episode in self.episodes],
        }
        temporary = self.root / f".{INDEX_NAME}.tmp"
        temporary.write_text(json.dumps(index, indent=1))
        os.replace(temporary, self.root / INDEX_NAME)
        self._closed = True

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # On an exception leave no index: the partial directory stays unreadable rather than silently short.
        if kind is None:
            self.close()

    def _check_episode(self, frames: np.ndarray, actions: np.ndarray | None, split: str) -> None:
        if self._closed:
            raise ValueError("writer is closed")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        expected = (self.frame_size, self.frame_size, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != expected:
            raise ValueError(f"frames must be uint8 [T, {self.frame_size}, {self.frame_size}, 3], "
                             f"got {frames.dtype} {frames.shape}")
        if len(frames) < 2:
            raise ValueError(f"an episode needs at least 2 frames, got {len(frames)}")
        if actions is not None and actions.shape != (len(frames) - 1,):
            raise ValueError(f"actions must have shape ({len(frames) - 1},), got {actions.shape}")

    def _shard_name(self, kind: str) -> str:
        return f"{kind}-{self._shard_index:05d}.npy"

    def _flush(self) -> None:
        if not self._buffered:
            return
        _save_atomic(self.root / self._shard_name("frames"), np.concatenate(self._frames))
        if self._actions:
            _save_atomic(self.root / self._shard_name("actions"), np.concatenate(self._actions))
        self._frames, self._actions, self._buffered = [], [], 0
        self._shard_index += 1


def _save_atomic(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
        # Durable before visible: after a crash the final name never holds a half-written file.
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class EpisodeDataset:
    """A read-only, memory-mapped view of a dataset directory written by EpisodeWriter."""

    def __init__(
        self, root: Path, source: str, frame_size: int, episodes: list[Episode],
        metadata: dict[str, Any], shards: dict[str, np.ndarray],
    ) -> None:
        self.root = root
        self.source = source
        self.frame_size = frame_size
        self.episodes = episodes
        self.metadata = metadata
        self._shards = shards

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> EpisodeDataset:
        """Read index.json and memory-map every shard it names, checking shapes up front."""
        root = Path(root)
        index = _read_index(root / INDEX_NAME)
        frame_size = index["frame_size"]
        episodes = [_parse_episode(item, root / INDEX_NAME) for item in index["episodes"]]
        shards = _map_shards(root, episodes, frame_size)
        return cls(root, index["source"], frame_size, episodes, index.get("metadata", {}), shards)

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return sum(episode.length for episode in self.episodes)

    def frames(self, episode_index: int) -> np.ndarray:
        """uint8 [T, H, W, 3], a memory-mapped view (copy it before writing)."""
        episode = self.episodes[episode_index]
        return self._shards[episode.shard][episode.start:episode.start + episode.length]

    def actions(self, episode_index: int) -> np.ndarray | None:
        """int16 [T-1] true actions (evaluation only), or None for sources without actions."""
        episode = self.episodes[episode_index]
        if episode.actions_shard is None:
            return None
        return self._shards[episode.actions_shard][episode.start:episode.start + episode.length - 1]

    def split(self, name: str) -> list[int]:
        """Indices of the episodes in split `name` ('train' or 'heldout')."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [i for i, episode in enumerate(self.episodes) if episode.split == name]

    def shard(self, name: str) -> np.ndarray:
        """A whole memory-mapped shard, for vectorised gathers across episodes (see clips.py)."""
        return self._shards[name]


def _read_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path} not found: not a dataset directory, or its writer did not finish")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a {FORMAT_NAME} index")
    if index.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path} has version {index.get('version')}, expected {FORMAT_VERSION}")
    for key, kind in (("source", str), ("frame_size", int), ("episodes", list)):
        if not isinstance(index.get(key), kind):
            raise DatasetError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if index["frame_size"] < 1:
        raise DatasetError(f"{path}: frame_size must be positive, got {index['frame_size']}")
    return index


def _parse_episode(item: Any, index_path: Path) -> Episode:
    try:
        episode = Episode(**item)
    except TypeError as error:
        raise DatasetError(f"{index_path}: bad episode entry {item!r}: {error}") from error
    well_typed = (
        isinstance(episode.shard, str) and isinstance(episode.start, int) and isinstance(episode.length, int)
        and isinstance(episode.actions_shard, (str, type(None))) and isinstance(episode.name, str)
    )
    # Shards are plain file names inside root: an index must not reach elsewhere on disk.
    local = well_typed and all(Path(name).name == name for name in (episode.shard, episode.actions_shard) if name)
    if not local or episode.split not in SPLITS or episode.start < 0 or episode.length < 2:
        raise DatasetError(f"{index_path}: bad episode entry {item!r}")
    return episode


def _map_shards(root: Path, episodes: list[Episode], frame_size: int) -> dict[str, np.ndarray]:
    """Memory-map every shard the episodes use, checking each is long enough for its episodes."""
    shards: dict[str, np.ndarray] = {}
    for episode in episodes:
        needed = [(episode.shard, (frame_size, frame_size, 3), np.uint8)]
        if episode.actions_shard is not None:
            needed.append((episode.actions_shard, (), np.int16))
        for name, row_shape, dtype in needed:
            if name not in shards:
                shards[name] = _map_shard(root / name, row_shape, dtype)
            if len(shards[name]) < episode.start + episode.length:
                raise DatasetError(f"{root / name} has {len(shards[name])} rows but the index needs "
                                   f"{episode.start + episode.length}: shard is truncated")
    return shards


def _map_shard(path: Path, row_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError as error:
        raise DatasetError(f"shard {path} is missing") from error
    except (ValueError, OSError, EOFError) as error:
        raise DatasetError(f"shard {path} is unreadable (truncated or corrupt): {error}") from error
    if array.dtype != dtype or array.shape[1:] != row_shape:
        raise DatasetError(f"shard {path} holds {array.dtype} {array.shape}, "
                           f"expected {np.dtype(dtype)} [N, {', '.join(map(str, row_shape))}]")
    return array
