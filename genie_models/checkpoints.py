"""Checkpoints as safetensors files plus a JSON manifest, published atomically and verified on load.
No pickle anywhere: tensors go through safetensors, everything else (config, optimizer scalars) is JSON.

Layout of one checkpoint directory::

    <name>.safetensors ...   one file per tensor group ("tokenizer", "optimizer", ...)
    manifest.json            written last: format version, kind, config, step, metrics, extra,
                             created_at and the sha256 + byte size of every file above

A run directory holds ``step-00000100/``-style checkpoints and a ``latest`` pointer file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_POINTER_NAME = "latest"
_FILE_SUFFIX = ".safetensors"
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HASH_CHUNK_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, tampered with, or in a format this code cannot read."""


@dataclass(frozen=True)
class FileEntry:
    """Integrity record for one file of a checkpoint."""

    sha256: str
    size_bytes: int


@dataclass
class Manifest:
    """What a checkpoint contains; serialised as ``manifest.json``."""

    kind: str
    config: dict[str, Any]
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        # NaN/inf metrics (a diverged run) are kept as JSON's NaN/Infinity extension rather than refused.
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; any structural problem becomes a ``CheckpointError``."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{MANIFEST_NAME} is unreadable: not valid JSON ({error})") from error
        if not isinstance(raw, dict):
            raise CheckpointError(f"{MANIFEST_NAME} is unreadable: expected a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{MANIFEST_NAME} has unsupported format version {version!r} "
                f"(this code reads version {FORMAT_VERSION})"
            )
        try:
            files = {name: FileEntry(str(entry["sha256"]), int(entry["size_bytes"]))
                     for name, entry in raw["files"].items()}
            manifest = cls(
                kind=str(raw["kind"]), config=dict(raw["config"]), step=int(raw["step"]),
                metrics={key: float(value) for key, value in raw.get("metrics", {}).items()},
                files=files, extra=dict(raw.get("extra", {})),
                created_at=str(raw.get("created_at", "")), format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{MANIFEST_NAME} is unreadable: malformed field ({error!r})") from error
        _check_file_names(manifest.files)
        return manifest


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint on disk; tensor groups are read lazily by ``tensors(name)``."""

    directory: Path
    manifest: Manifest
    map_location: str | torch.device = "cpu"

    @property
    def groups(self) -> list[str]:
        return sorted(name.removesuffix(_FILE_SUFFIX) for name in self.manifest.files)

    def tensors(self, name: str, map_location: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Load the tensor group ``name`` (e.g. "tokenizer") onto ``map_location``."""
        file_name = name + _FILE_SUFFIX
        if file_name not in self.manifest.files:
            raise CheckpointError(
                f"checkpoint {self.directory} has no tensor group {name!r}; it has {self.groups}"
            )
        device = self.map_location if map_location is None else map_location
        return load_file(self.directory / file_name, device=str(device))


def save_checkpoint(
    directory: Path,
    tensors_by_file: Mapping[str, Mapping[str, torch.Tensor]],
    config: Mapping[str, Any],
    step: int,
    metrics: Mapping[str, float] | None = None,
    kind: str = "model",
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write a checkpoint to ``directory`` atomically and return its manifest.

    Everything is written into a hidden temporary sibling directory (tensor files first,
    ``manifest.json`` last), fsynced, then renamed into place, so a reader sees either the old
    checkpoint, no checkpoint, or the complete new one. ``extra`` is free JSON stored in the
    manifest, e.g. ``{"optimizer": meta}`` from ``optimizer_state_to_tensors``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        files = {name + _FILE_SUFFIX: _write_group(staging, name, group)
                 for name, group in tensors_by_file.items()}
        manifest = Manifest(
            kind=kind, config=dict(config), step=int(step),
            metrics={key: float(value) for key, value in (metrics or {}).items()},
            files=files, extra=dict(extra or {}),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        _write_text_durably(staging / MANIFEST_NAME, manifest.to_json())
        _fsync_directory(staging)
        _publish_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def load_checkpoint(
    directory: Path, verify: bool = True, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Read and (by default) verify the manifest and every file it lists; never unpickles."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise CheckpointError(
            f"{manifest_path} is missing: {directory} is not a complete checkpoint"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest_path} is unreadable ({error})") from error
    manifest = Manifest.from_json(text)
    if verify:
        for file_name, entry in manifest.files.items():
            _verify_file(directory / file_name, entry)
    return LoadedCheckpoint(directory=directory, manifest=manifest, map_location=map_location)


def save_run_checkpoint(
    root: Path,
    tensors_by_file: Mapping[str, Mapping[str, torch.Tensor]],
    config: Mapping[str, Any],
    step: int,
    metrics: Mapping[str, float] | None = None,
    kind: str = "model",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``root/step-{step:08d}`` and then point ``root/latest`` at it; returns the checkpoint path."""
    root = Path(root)
    directory = root / f"step-{int(step):08d}"
    save_checkpoint(directory, tensors_by_file, config, step, metrics=metrics, kind=kind, extra=extra)
    # The pointer moves only after the checkpoint is complete, so it never names half a checkpoint.
    _write_text_durably(root / LATEST_POINTER_NAME, directory.name + "\n")
    _fsync_directory(root)
    return directory


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names; if the pointer is absent or dangling, the newest complete one."""
    root = Path(root)
    pointer = root / LATEST_POINTER_NAME
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named.name and (named / MANIFEST_NAME).is_file():
            return named
    # A crash between publishing a checkpoint and moving the pointer leaves complete checkpoints only.
    complete = [path for _, path in _step_directories(root) if (path / MANIFEST_NAME).is_file()]
    return complete[-1] if complete else None


def prune_checkpoints(root: Path, keep: int = 3) -> list[Path]:
    """Delete all but the ``keep`` newest step checkpoints, never the one ``latest`` names.

    Returns the directories removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = Path(root)
    protected = latest_checkpoint(root)
    candidates = [path for _, path in _step_directories(root)][:-keep]
    removed = [path for path in candidates if path != protected]
    for path in removed:
        shutil.rmtree(path)
    return removed


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()`` into safetensors-ready tensors plus JSON-able metadata.

    Tensors are keyed ``state.<param_index>.<name>`` and ``param_groups.<group>.<name>``; every
    non-tensor value goes into the metadata, so the pair round-trips without pickle.
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalar_state: dict[str, dict[str, Any]] = {}
    for param_index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_index}.{name}"] = value
            else:
                scalar_state.setdefault(str(param_index), {})[name] = _json_value(value)
    groups: list[dict[str, Any]] = []
    for group_index, group in enumerate(state_dict["param_groups"]):
        plain: dict[str, Any] = {}
        for name, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"param_groups.{group_index}.{name}"] = value
            else:
                plain[name] = _json_value(value)
        groups.append(plain)
    tuple_keys = sorted({name for group in state_dict["param_groups"]
                         for name, value in group.items() if isinstance(value, tuple)})
    meta = {"scalar_state": scalar_state, "param_groups": groups, "tuple_keys": tuple_keys}
    return tensors, meta


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Inverse of ``optimizer_state_to_tensors``: rebuild the state dict and load it into ``optimizer``."""
    tuple_keys = set(meta.get("tuple_keys", []))
    groups = [{name: tuple(value) if name in tuple_keys else value for name, value in group.items()}
              for group in meta["param_groups"]]
    state: dict[int, dict[str, Any]] = {
        int(index): dict(values) for index, values in meta.get("scalar_state", {}).items()
    }
    for key, value in tensors.items():
        section, index, name = key.split(".", 2)
        if section == "state":
            state.setdefault(int(index), {})[name] = value
        elif section == "param_groups":
            groups[int(index)][name] = value
        else:
            raise CheckpointError(f"unexpected optimizer tensor key {key!r}")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_group(staging: Path, name: str, group: Mapping[str, torch.Tensor]) -> FileEntry:
    if not _GROUP_NAME.match(name) or name == MANIFEST_NAME.removesuffix(".json"):
        raise ValueError(f"invalid tensor group name {name!r}: use letters, digits, '_', '.', '-'")
    for key, value in group.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"tensor group {name!r}: value for {key!r} is {type(value).__name__}, not a Tensor"
            )
    path = staging / (name + _FILE_SUFFIX)
    # safetensors needs dense CPU-layout tensors; detach so parameters can be passed directly.
    save_file({key: value.detach().contiguous() for key, value in group.items()}, path)
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    return FileEntry(sha256=_sha256_of(path), size_bytes=path.stat().st_size)


def _check_file_names(files: Mapping[str, FileEntry]) -> None:
    """A manifest may only list group files inside its own directory (no paths, no traversal)."""
    for name in files:
        if not (name.endswith(_FILE_SUFFIX) and _GROUP_NAME.match(name.removesuffix(_FILE_SUFFIX))):
            raise CheckpointError(f"{MANIFEST_NAME} is unreadable: invalid file name {name!r}")


def _verify_file(path: Path, entry: FileEntry) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from checkpoint {path.parent}")
    size = path.stat().st_size
    if size != entry.size_bytes:
        raise CheckpointError(
            f"{path.name} has a size mismatch: {size} bytes on disk, manifest says {entry.size_bytes} "
            "(truncated or replaced?)"
        )
    digest = _sha256_of(path)
    if digest != entry.sha256:
        raise CheckpointError(
            f"{path.name} has a checksum mismatch: sha256 {digest} on disk, manifest says {entry.sha256} "
            "(corrupted or tampered with)"
        )


def _publish_directory(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; an existing checkpoint is moved aside first, removed last."""
    if not directory.exists():
        os.replace(staging, directory)
    else:
        # POSIX cannot atomically swap two non-empty directories; in the short window between these
        # renames readers see no checkpoint (never a partial one), and the old one survives a crash.
        retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
        os.replace(directory, retired)
        os.replace(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_directory(directory.parent)


def _write_text_durably(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fsync_directory(path: Path) -> None:
    """Persist a rename; some platforms (Windows) cannot open directories, which is harmless to skip."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # fsync on a directory is unsupported on some filesystems; the rename itself is still atomic.
    finally:
        os.close(descriptor)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _step_directories(root: Path) -> list[tuple[int, Path]]:
    """``step-N`` directories under ``root``, oldest first; hidden staging directories never match."""
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (match := _STEP_DIR.match(path.name))]
    return sorted(found)


def _json_value(value: Any) -> Any:
    """Optimizer hyper-parameters are plain scalars, tuples or None; refuse anything JSON cannot hold."""
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"optimizer state value {value!r} ({type(value).__name__}) is not JSON-serialisable")


__all__ = [
    "FORMAT_VERSION", "CheckpointError", "FileEntry", "LoadedCheckpoint", "Manifest",
    "latest_checkpoint", "load_checkpoint", "load_optimizer_state", "optimizer_state_to_tensors",
    "prune_checkpoints", "save_checkpoint", "save_run_checkpoint",
]
