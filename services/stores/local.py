"""The `local` store: keys are files under one directory. The embedded default (no servers needed)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from services.settings import StoreSettings
from services.stores.base import ObjectNotFound, check_key


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.description = f"local store at {self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        self._replace(key, lambda temporary: shutil.copyfile(path, temporary))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._replace(key, lambda temporary: temporary.write_bytes(data))

    def _replace(self, key: str, write) -> None:
        # Write a hidden sibling, fsync, rename: the key holds the old or the whole new content, never part.
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            write(temporary)
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{key} not found in the {self.description}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{key} not found in the {self.description}")
        return source.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (path.relative_to(self.root).as_posix() for path in self.root.rglob("*")
                if path.is_file() and not path.name.startswith("."))
        return sorted(key for key in keys if key.startswith(prefix))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def from_settings(settings: StoreSettings) -> LocalStore:
    return LocalStore(Path(settings.root))
