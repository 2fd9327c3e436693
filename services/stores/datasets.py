"""Video datasets in a store: `datasets/<name>/<videos...>` plus `dataset.json` (sha256 of each, written last).

Videos put there by any S3 client without a dataset.json are accepted too, unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.stores.base import ObjectNotFound, ObjectStore, StoreError

DATASETS_PREFIX = "datasets"
DATASET_INDEX = "dataset.json"
# genie_models.data.video_folder.VIDEO_SUFFIXES (a test keeps them equal): importing genie_models.data here
# would load torch into the job API, which only needs to check that a dataset has videos.
VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif"})


def upload_videos(store: ObjectStore, src_dir: Path, name: str) -> list[str]:
    """Upload every video under src_dir (recursively, paths kept) as dataset name; returns the keys."""
    from genie_models.data.video_folder import find_videos

    videos = find_videos(src_dir)
    index = {}
    for path in videos:
        relative = path.relative_to(src_dir).as_posix()
        store.put_file(f"{DATASETS_PREFIX}/{name}/{relative}", path)
        index[relative] = {"sha256": _sha256(path), "size_bytes": path.stat().st_size}
    store.put_bytes(f"{DATASETS_PREFIX}/{name}/{DATASET_INDEX}", json.dumps({"videos": index}, indent=1).encode())
    return [f"{DATASETS_PREFIX}/{name}/{relative}" for relative in index]


def dataset_videos(store: ObjectStore, name: str) -> list[str]:
    """Keys of the dataset's video files (empty if there is no such dataset)."""
    return [key for key in store.list(f"{DATASETS_PREFIX}/{name}/")
            if Path(key).suffix.lower() in VIDEO_SUFFIXES]


def download_videos(store: ObjectStore, name: str, dest: Path) -> list[Path]:
    """Fetch the dataset's videos into dest, verifying each against dataset.json when there is one."""
    prefix = f"{DATASETS_PREFIX}/{name}/"
    keys = dataset_videos(store, name)
    if not keys:
        raise ObjectNotFound(f"dataset {name!r} has no videos in the {store.description} (under {prefix})")
    try:
        index = json.loads(store.get_bytes(prefix + DATASET_INDEX))["videos"]
    except ObjectNotFound:
        index = {}
    for relative in index:
        if prefix + relative not in keys:
            raise ObjectNotFound(f"{prefix}{relative} (listed in {prefix}{DATASET_INDEX}) is missing from the "
                                 f"{store.description}: it was deleted; upload the dataset again")
    paths = []
    for key in keys:
        path = Path(dest) / key[len(prefix):]
        store.get_file(key, path)
        expected = index.get(key[len(prefix):])
        if expected and _sha256(path) != expected["sha256"]:
            raise StoreError(f"{key} in the {store.description} fails its sha256 check (corrupted); upload it again")
        paths.append(path)
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
