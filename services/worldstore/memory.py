"""The `memory` world store: records in this process (the embedded default; lost with the process)."""

from __future__ import annotations

import threading

from services.worldstore.base import WorldRecord


class MemoryWorldStore:
    """Implements services.worldstore.base.WorldStore with a dict behind one lock."""

    def __init__(self, settings=None):
        self._records: dict[str, WorldRecord] = {}
        self._lock = threading.Lock()

    def create(self, record: WorldRecord) -> None:
        with self._lock:
            self._records[record.world_id] = record

    def load(self, world_id: str) -> WorldRecord | None:
        with self._lock:
            return self._records.get(world_id)

    def commit(self, record: WorldRecord, previous_step: int) -> bool:
        with self._lock:
            stored = self._records.get(record.world_id)
            if stored is None or stored.step != previous_step:
                return False
            self._records[record.world_id] = record
            return True

    def delete(self, world_id: str, owner: str) -> bool:
        with self._lock:
            return self._records.pop(world_id, None) is not None

    def list(self, owner: str) -> list[WorldRecord]:
        with self._lock:
            mine = [record for record in self._records.values() if record.owner == owner]
        return sorted(mine, key=lambda record: record.created_at)

    def count(self, owner: str) -> int:
        with self._lock:
            return sum(record.owner == owner for record in self._records.values())

    def close(self) -> None:
        pass
