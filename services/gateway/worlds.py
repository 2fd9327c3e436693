"""Per-world state and the registry of open worlds: capacity, lookup, idle eviction.

A world keeps the token history its model's caches depend on, so a backend that lost them can rebuild.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.gateway.errors import NotFound, ResourceExhausted


@dataclass(frozen=True)
class Sampling:
    seed: int
    num_maskgit_steps: int
    temperature: float


@dataclass
class World:
    world_id: str
    model: str
    sampling: Sampling
    output_format: int  # a genie.v1 FrameFormat value; the domain only stores it
    history_frames: int  # frames of token history kept for cache rebuilds
    step_count: int = 0
    last_access: float = field(default_factory=time.monotonic)
    closed: bool = False
    # One step in flight per world: held from submission until the step's result is committed.
    step_lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: deque = field(init=False)
    actions: deque = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = deque(maxlen=self.history_frames)
        self.actions = deque(maxlen=self.history_frames)

    def remember(self, tokens: np.ndarray, action: int) -> None:
        """Append one frame's tokens [h, w] and the action that led into it."""
        self.tokens.append(np.asarray(tokens))
        self.actions.append(int(action))

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [T, h, w], actions [T]) of the last history_frames frames."""
        return np.stack(self.tokens), np.asarray(self.actions, dtype=np.int64)

    def touch(self) -> None:
        self.last_access = time.monotonic()

    def idle_seconds(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_access


class WorldRegistry:
    """Open worlds by id, at most max_worlds of them (reservations count, so racing creates cannot overshoot)."""

    def __init__(self, max_worlds: int):
        self.max_worlds = max_worlds
        self._worlds: dict[str, World] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    def reserve(self) -> str:
        """Claim room for one world; returns its new id. Call add() or release() afterwards."""
        with self._lock:
            if len(self._worlds) + self._reserved >= self.max_worlds:
                raise ResourceExhausted(f"this gateway already holds its maximum of {self.max_worlds} worlds: "
                                        "close worlds you no longer play, or retry on another gateway")
            self._reserved += 1
        return uuid.uuid4().hex

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1

    def add(self, world: World) -> None:
        with self._lock:
            self._reserved -= 1
            self._worlds[world.world_id] = world

    def get(self, world_id: str) -> World:
        with self._lock:
            world = self._worlds.get(world_id)
        if world is None:
            raise NotFound(f"no open world with id {world_id!r}: it was never created, was closed, "
                           "or was idle too long (create a new one)")
        return world

    def remove(self, world_id: str) -> World:
        with self._lock:
            world = self._worlds.pop(world_id, None)
        if world is None:
            raise NotFound(f"no open world with id {world_id!r}: it was never created or is already closed")
        return world

    def all(self) -> list[World]:
        with self._lock:
            return list(self._worlds.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._worlds)

    def idle(self, timeout_s: float, now: float | None = None) -> list[World]:
        """Worlds not accessed for timeout_s seconds."""
        now = time.monotonic() if now is None else now
        return [world for world in self.all() if world.idle_seconds(now) >= timeout_s]


class Reaper:
    """A daemon thread that calls evict() every interval_s until stopped."""

    def __init__(self, evict: Callable[[], None], interval_s: float):
        self._evict, self._interval_s = evict, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="world-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._evict()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
