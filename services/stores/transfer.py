"""Copying folders between disk and a store so that a reader never sees half of one.

A checkpoint goes up files first and manifest.json last; it comes down manifest first, then the files it
lists, into a hidden staging folder, is verified by sha256 (genie_models.checkpoints) and only then renamed
into place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from genie_models.checkpoints import MANIFEST_NAME, CheckpointError, load_checkpoint
from services.stores.base import ObjectNotFound, ObjectStore


def put_tree(store: ObjectStore, directory: Path, prefix: str, last: str) -> list[str]:
    """Upload every file under directory to prefix/..., the file named `last` after all others; returns keys."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file() and not path.name.startswith("."))
    relative = [path.relative_to(directory).as_posix() for path in files]
    if last not in relative:
        raise FileNotFoundError(f"{directory} has no {last}: not a complete folder")
    ordered = [name for name in relative if name != last] + [last]
    for name in ordered:
        store.put_file(f"{prefix}/{name}", directory / name)
    return [f"{prefix}/{name}" for name in ordered]


def get_tree(store: ObjectStore, prefix: str, directory: Path, marker: str) -> Path:
    """Download prefix/... into directory (via a staging folder); prefix/marker must exist (it is written last)."""
    directory = Path(directory)
    keys = store.list(prefix + "/")
    if f"{prefix}/{marker}" not in keys:
        raise ObjectNotFound(f"{prefix}/{marker} not found in the {store.description}: {prefix} is not complete")
    staging = _staging(directory)
    try:
        for key in keys:
            store.get_file(key, staging / key[len(prefix) + 1:])
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def put_checkpoint(store: ObjectStore, directory: Path, prefix: str) -> list[str]:
    """Upload a checkpoint folder (files it lists, then manifest.json); the checkpoint is verified first."""
    load_checkpoint(directory, verify=True)
    manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
    for name in sorted(manifest["files"]):
        store.put_file(f"{prefix}/{name}", Path(directory) / name)
    store.put_file(f"{prefix}/{MANIFEST_NAME}", Path(directory) / MANIFEST_NAME)
    return [f"{prefix}/{name}" for name in sorted(manifest["files"])] + [f"{prefix}/{MANIFEST_NAME}"]


def get_checkpoint(store: ObjectStore, prefix: str, directory: Path, immutable: bool = False) -> Path:
    """Download a checkpoint and verify every file's sha256 before it appears at directory.

    immutable: the checkpoint never changes (a published version), so a complete copy that another process
    put at directory meanwhile is kept, not replaced under a reader that has it open (seen: a model service
    verifying the cached copy while a second service, started at the same time, swapped in its own download).
    Raises CheckpointError naming the file on a checksum or size mismatch, ObjectNotFound if a file is gone.
    """
    staging = _staging(Path(directory))
    try:
        store.get_file(f"{prefix}/{MANIFEST_NAME}", staging / MANIFEST_NAME)
        manifest = json.loads((staging / MANIFEST_NAME).read_text(encoding="utf-8"))
        for name in sorted(manifest["files"]):
            store.get_file(f"{prefix}/{name}", staging / name)
        try:
            load_checkpoint(staging, verify=True)
        except CheckpointError as error:
            raise CheckpointError(f"{prefix} in the {store.description} is refused: {error}") from None
        if immutable and (Path(directory) / MANIFEST_NAME).is_file():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _replace_directory(staging, Path(directory))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(directory)


def delete_checkpoint(store: ObjectStore, prefix: str) -> None:
    """Manifest first, so the checkpoint stops being complete before any of its files goes."""
    store.delete(f"{prefix}/{MANIFEST_NAME}")
    for key in store.list(prefix + "/"):
        store.delete(key)


def _staging(directory: Path) -> Path:
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    return staging


def _replace_directory(staging: Path, directory: Path) -> None:
    if directory.exists():
        retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(directory)
