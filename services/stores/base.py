"""The object-store plugin interface: flat keys ("models/coinrun/3/manifest.json") mapped to bytes.

Datasets, run checkpoints and published models all go through it, so `local` and `s3` are interchangeable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from services import registry
from services.settings import StoreSettings

# genie_models.checkpoints.MANIFEST_NAME (a test keeps them equal), without importing torch for it.
MANIFEST_NAME = "manifest.json"


class StoreError(RuntimeError):
    """A store call failed; the message names the store, the key and the cause."""


class ObjectNotFound(StoreError):
    """The key does not exist (never written, or deleted)."""


class StoreUnavailable(StoreError):
    """The store could not be reached, even after retrying for the configured time."""


class StoreAccessDenied(StoreError):
    """The store refused the credentials or the request."""


@runtime_checkable
class ObjectStore(Protocol):
    """Each put is atomic: a reader sees the old object, no object, or the whole new one."""

    description: str  # where the store is, for messages ("s3://genie at 10.0.0.5:9000"); never credentials

    def put_file(self, key: str, path: Path) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Every key starting with prefix, sorted."""
        ...

    def delete(self, key: str) -> None: ...


def open_store(settings: StoreSettings) -> ObjectStore:
    """The store plugin named by settings.kind (entry point group genie.stores), built from settings."""
    return registry.get("stores", settings.kind)(settings)


def check_key(key: str) -> str:
    """Keys are relative slash-separated paths without '..' or empty parts, so no store escapes its root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid store key {key!r}: use a relative path like 'models/name/1/manifest.json'")
    return key
