"""Run checkpoints mirrored to a store, so a stage interrupted on one worker resumes on another.

Store layout of one run: `<prefix>/step-00000100/...` (checkpoint, manifest last) and `<prefix>/latest`
(the name of the newest complete one, written after it).
"""

from __future__ import annotations

import re
from pathlib import Path

from genie_models.checkpoints import MANIFEST_NAME, CheckpointError, latest_checkpoint
from services.stores.base import ObjectNotFound, ObjectStore
from services.stores.transfer import delete_checkpoint, get_checkpoint, put_checkpoint

_STEP = re.compile(r"^step-(\d+)$")


class RunSync:
    def __init__(self, store: ObjectStore, root: Path, prefix: str, keep: int = 2):
        self.store, self.root, self.prefix, self.keep = store, Path(root), prefix, keep
        self.pushed: str | None = None

    def stored_steps(self) -> list[str]:
        """Complete checkpoints in the store, oldest first."""
        names = {key.split("/")[-2] for key in self.store.list(self.prefix + "/")
                 if key.endswith("/" + MANIFEST_NAME)}
        return sorted(name for name in names if _STEP.match(name))

    def latest_stored(self) -> str | None:
        try:
            named = self.store.get_bytes(f"{self.prefix}/latest").decode().strip()
        except ObjectNotFound:
            named = None
        complete = self.stored_steps()
        return named if named in complete else (complete[-1] if complete else None)

    def push(self) -> str | None:
        """Upload the local latest checkpoint if it is new; returns its store key, or None if nothing new."""
        local = latest_checkpoint(self.root)
        if local is None or local.name == self.pushed:
            return None
        key = f"{self.prefix}/{local.name}"
        try:
            put_checkpoint(self.store, local, key)
        except (FileNotFoundError, CheckpointError):
            return None  # pruned by the trainer while we uploaded; the next one will go up
        self.store.put_bytes(f"{self.prefix}/latest", f"{local.name}\n".encode())
        self.pushed = local.name
        for old in self.stored_steps()[:-self.keep]:
            delete_checkpoint(self.store, f"{self.prefix}/{old}")
        return key

    def pull(self) -> int:
        """Bring the store's newest complete checkpoint here; returns its step (0 if the store has none)."""
        name = self.latest_stored()
        if name is None:
            return 0
        target = self.root / name
        if not (target / MANIFEST_NAME).is_file():
            get_checkpoint(self.store, f"{self.prefix}/{name}", target)
        (self.root / "latest").write_text(name + "\n", encoding="utf-8")
        self.pushed = name
        return int(_STEP.match(name).group(1))
