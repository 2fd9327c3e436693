"""Per-world state held by one gateway, and the registry of the worlds it holds: capacity, lookup, idle.

A World mirrors its record in the world store (the truth) plus what only this process needs: the
chain of its pending steps and whether the backend's caches must be rebuilt before its next step.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from services.gateway.errors import ResourceExhausted
from services.worldstore.base import WorldRecord


@dataclass(frozen=True)
class Sampling:
    seed: int
    num_maskgit_steps: int
    temperature: float
    action_guidance: float | None = None  # None: the model has no action pointer


@dataclass
class World:
    record: WorldRecord  # the last committed state; replaced whole on each commit
    history_frames: int  # frames of token history kept for cache rebuilds
    closed: bool = False
    # The backend's caches may not match the record (a new gateway, a failed batch): rebuild before stepping.
    needs_rebuild: bool = False
    # Steps of one world run one at a time: each new step starts when this (the latest) one is done.
    tail: Future | None = None
    guard: threading.Lock = field(default_factory=threading.Lock)

    @property
    def world_id(self) -> str:
        return self.record.world_id

    @property
    def model(self) -> str:
        return self.record.model

    @property
    def owner(self) -> str:
        return self.record.owner

    @property
    def step_count(self) -> int:
        return self.record.step

    @property
    def output_format(self) -> int:
        return self.record.output_format

    @property
    def sampling(self) -> Sampling:
        return sampling_of(self.record)

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [T, h, w], actions [T]) of the last history_frames frames."""
        return self.record.tokens, self.record.actions

    def advanced(self, tokens: np.ndarray, action: int, frame: np.ndarray) -> WorldRecord:
        """The record after one more step (not yet committed): history appended and cut to history_frames."""
        keep = self.history_frames
        return replace(self.record, step=self.record.step + 1,
                       tokens=np.concatenate([self.record.tokens, tokens[None]])[-keep:],
                       actions=np.append(self.record.actions, action)[-keep:],
                       last_frame=frame, last_action=action, updated_at=time.time())

    def idle_seconds(self, now: float | None = None) -> float:
        return idle_seconds(self.record, now)

    def chain(self, result: Future, start: Callable[[], None]) -> None:
        """Runs start() once every earlier step of this world is done (now, if none is pending)."""
        with self.guard:
            previous, self.tail = self.tail, result
        if previous is None:
            start()
        else:
            previous.add_done_callback(lambda _: start())

    def wait_idle(self, timeout_s: float) -> None:
        """Waits (at most timeout_s) for the world's pending steps to finish."""
        with self.guard:
            tail = self.tail
        if tail is not None:
            try:
                tail.exception(timeout=timeout_s)
            except TimeoutError:
                pass


def sampling_of(record: WorldRecord) -> Sampling:
    return Sampling(record.seed, record.num_maskgit_steps, record.temperature, record.action_guidance)


def idle_seconds(record: WorldRecord, now: float | None = None) -> float:
    """Seconds since the world was created or last stepped (wall clock: records move between gateways)."""
    return max(0.0, (time.time() if now is None else now) - record.updated_at)


def new_world_id() -> str:
    return uuid.uuid4().hex


class WorldRegistry:
    """The worlds this gateway holds by id, at most max_worlds of them (reservations count, so racing
    creates cannot overshoot); the world store may hold more, created or held by other gateways."""

    def __init__(self, max_worlds: int):
        self.max_worlds = max_worlds
        self._worlds: dict[str, World] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    def _check_room(self) -> None:
        if len(self._worlds) + self._reserved >= self.max_worlds:
            raise ResourceExhausted(f"this gateway already holds its maximum of {self.max_worlds} worlds: "
                                    "close worlds you no longer play, or retry on another gateway")

    def reserve(self) -> str:
        """Claim room for one world; returns its new id. Call add() or release() afterwards."""
        with self._lock:
            self._check_room()
            self._reserved += 1
        return new_world_id()

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1

    def add(self, world: World) -> None:
        with self._lock:
            self._reserved -= 1
            self._worlds[world.world_id] = world

    def adopt(self, world: World) -> World:
        """Holds a world loaded from the store (created or held elsewhere); returns the one held."""
        with self._lock:
            held = self._worlds.get(world.world_id)
            if held is not None:
                return held
            self._check_room()
            self._worlds[world.world_id] = world
            return world

    def get(self, world_id: str) -> World | None:
        with self._lock:
            return self._worlds.get(world_id)

    def remove(self, world_id: str) -> World | None:
        with self._lock:
            return self._worlds.pop(world_id, None)

    def all(self) -> list[World]:
        with self._lock:
            return list(self._worlds.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._worlds)

    def idle(self, timeout_s: float, now: float | None = None) -> list[World]:
        """Worlds not stepped for timeout_s seconds."""
        now = time.time() if now is None else now
        return [world for world in self.all() if world.idle_seconds(now) >= timeout_s]


class Reaper:
    """A daemon thread that calls evict() every interval_s until stopped (also the catalog's poller)."""

    def __init__(self, evict: Callable[[], None], interval_s: float, name: str = "world-reaper"):
        self._evict, self._interval_s = evict, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._evict()

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
