"""Published models, versioned: `models/<name>/<version>/` (safetensors + manifest.json, written last) and
`models/<name>/latest` (a one-line pointer, replaced in one put after the version is complete).

Versions are integers counting up from 1 and immutable once published. Torch loads only when a version is
published or loaded, so listing and resolving stay cheap for the job API and the gateway. A version is listed only when its
manifest exists, so a half-uploaded or half-deleted one is never listed or loaded; loading verifies sha256.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from services.stores.base import MANIFEST_NAME, ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)
MODELS_PREFIX = "models"
LATEST = "latest"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class UnknownModel(LookupError):
    """No such model or version; the message lists what exists."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def prefix(self) -> str:
        return f"{MODELS_PREFIX}/{self.name}/{self.version}"


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '.', '_', '-'")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` (the latest version) or `name@version`."""
    name, _, version = ref.partition("@")
    check_model_name(name)
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"invalid version in {ref!r}: write name@N with N >= 1, or just the name for the latest")
    return name, int(version)


def split_key(key: str) -> tuple[str, int | None]:
    """A serving key -> (model name, version): `name@N` is a published version, a bare name a fixed model (None)."""
    name, _, version = key.partition("@")
    return name, int(version) if version else None


class ModelCatalog:
    """Publish, list, resolve, load and delete model versions in one store."""

    def __init__(self, store: ObjectStore, cache_dir: Path | None = None):
        self.store, self.cache_dir = store, Path(cache_dir) if cache_dir else None

    def models(self) -> list[str]:
        names = {key.split("/")[1] for key in self.store.list(f"{MODELS_PREFIX}/") if key.count("/") >= 2}
        return sorted(name for name in names if self.versions(name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of name, oldest first."""
        found = set()
        for key in self.store.list(f"{MODELS_PREFIX}/{check_model_name(name)}/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == MANIFEST_NAME and parts[2].isdigit():
                found.add(int(parts[2]))
        return sorted(found)

    def next_version(self, name: str) -> int:
        """One past every version folder, complete or not, so a new version never reuses a half-written one."""
        numbers = [int(key.split("/")[2]) for key in self.store.list(f"{MODELS_PREFIX}/{check_model_name(name)}/")
                   if key.count("/") >= 3 and key.split("/")[2].isdigit()]
        return max(numbers, default=0) + 1

    def publish(self, name: str, checkpoint: Path, version: int | None = None) -> ModelVersion:
        """Upload a verified checkpoint as name@version (default: the next one), then move `latest` to it.

        Publishing the same version again (a retried publish) rewrites identical content: still one version.
        """
        from services.stores.transfer import put_checkpoint

        model = ModelVersion(check_model_name(name), version or self.next_version(name))
        put_checkpoint(self.store, checkpoint, model.prefix)
        current = self.pointer(name)
        if current is None or current <= model.version:
            self.store.put_bytes(f"{MODELS_PREFIX}/{name}/{LATEST}", f"{model.version}\n".encode())
        return model

    def resolve(self, ref: str) -> ModelVersion:
        name, version = parse_ref(ref)
        available = self.versions(name)
        if not available:
            raise UnknownModel(f"no published model {name!r}; models: {', '.join(self.models()) or 'none'}")
        if version is None:
            pointed = self.pointer(name)
            version = pointed if pointed in available else available[-1]
        elif version not in available:
            raise UnknownModel(f"{name} has no version {version}; versions: {', '.join(map(str, available))}")
        return ModelVersion(name, version)

    def load(self, ref: str, cache_dir: Path | None = None) -> tuple[ModelVersion, Path]:
        """Download (once) and verify a version; returns it and its local checkpoint folder."""
        from genie_models.checkpoints import load_checkpoint
        from services.stores.transfer import get_checkpoint

        root = Path(cache_dir or self.cache_dir or "out/model-cache")
        model = self.resolve(ref)
        local = root / model.name / str(model.version)
        started = time.perf_counter()
        cached = (local / MANIFEST_NAME).is_file()
        if cached:
            load_checkpoint(local, verify=True)  # versions are immutable; verify the cached copy anyway
        else:
            get_checkpoint(self.store, model.prefix, local, immutable=True)
        # The time a new version spends here is part of its way to new worlds (bench/bench_jobs.py reads this line).
        log.info("fetched %s (%s + sha256) in %.3f s", model.ref, "cached" if cached else "download",
                 time.perf_counter() - started, extra={"model": model.ref})
        return model, local

    def delete(self, ref: str) -> ModelVersion:
        """Delete one version; if it was the latest, `latest` moves to the newest remaining one first."""
        from services.stores.transfer import delete_checkpoint

        name, version = parse_ref(ref)
        if version is None:
            raise ValueError(f"delete needs an explicit version: {name}@N")
        model = self.resolve(ref)
        remaining = [v for v in self.versions(name) if v != version]
        if self.pointer(name) == version:
            if remaining:
                self.store.put_bytes(f"{MODELS_PREFIX}/{name}/{LATEST}", f"{remaining[-1]}\n".encode())
            else:
                self.store.delete(f"{MODELS_PREFIX}/{name}/{LATEST}")
        delete_checkpoint(self.store, model.prefix)
        return model

    def pointer(self, name: str) -> int | None:
        """The version `latest` names (one small read: what a server polls to notice a new version), or None."""
        try:
            text = self.store.get_bytes(f"{MODELS_PREFIX}/{name}/{LATEST}").decode().strip()
        except ObjectNotFound:
            return None
        return int(text) if text.isdigit() else None
