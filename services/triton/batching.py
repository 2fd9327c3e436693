"""Helpers shared by the Triton model services: spreading a dynamic batch's requests into rows and back.

Triton hands a batched model several requests at once; each may carry one or more rows (its batch dim).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.proxy.types import Request

from services.triton.protocol import Status

UNBATCHED = ModelConfig(batching=False)
# Input of the start models: the world's frame index of a history's first frame (exact cache rebuilds).
FIRST_POSITION = Tensor(name="first_position", dtype=np.int64, shape=(1,))

InferFunc = Callable[[list[Request]], list[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Binding:
    """One Triton model of a service: its name, callable and tensor signature."""

    name: str
    infer: InferFunc
    inputs: Sequence[Tensor]
    outputs: Sequence[Tensor]
    config: ModelConfig


def gather_rows(requests: Sequence[Request], names: Sequence[str]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Concatenate each named input over the requests -> (inputs [N, ...], row count of each request)."""
    counts = [len(request[names[0]]) for request in requests]
    return {name: np.concatenate([request[name] for request in requests]) for name in names}, counts


def split_rows(outputs: dict[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """The inverse of gather_rows: one output dict per request, in request order."""
    bounds = np.cumsum(counts)[:-1]
    pieces = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: pieces[name][index] for name in outputs} for index in range(len(counts))]


def world_ids(column: np.ndarray) -> list[str]:
    """A BYTES column [N, 1] of world ids -> str ids."""
    return [bytes(value).decode("utf-8") for value in column.reshape(-1)]


def end_sessions(requests: Sequence[Request], lock: threading.Lock,
                 end: Callable[[str], None]) -> list[dict[str, np.ndarray]]:
    """The `*_end` models of the stateful services: forget each named world's cache (unknown ids are fine)."""
    results = []
    for request in requests:
        [world_id] = world_ids(request["world_id"])
        with lock:
            end(world_id)
        results.append({"status": np.array([Status.OK], dtype=np.int8)})
    return results


class StepLedger:
    """The step index each cached world expects next, so a step that was applied but never acknowledged (the
    caller saw an error: a batch half-done across services, a lost answer) is not applied twice: its retry
    carries an index already passed and is answered "not cached", and the caller rebuilds the world from the
    history it owns. Unknown after a (re)start: the caller's history is the truth then."""

    def __init__(self, max_worlds: int):
        self.max_worlds = max_worlds
        self._next: dict[str, int | None] = {}

    def started(self, world_id: str, cached: Callable[[str], bool]) -> None:
        if len(self._next) >= 2 * self.max_worlds:  # drop worlds the cache evicted meanwhile
            self._next = {key: value for key, value in self._next.items() if cached(key)}
        self._next[world_id] = None

    def fits(self, world_id: str, step_index: int) -> bool:
        """False for a world not started since its cache went (end, eviction) or a step index out of turn."""
        if world_id not in self._next:
            return False
        expected = self._next[world_id]
        return expected is None or expected == step_index

    def applied(self, world_id: str, step_index: int) -> None:
        self._next[world_id] = step_index + 1

    def ended(self, world_id: str) -> None:
        self._next.pop(world_id, None)


def repeated_rows(ids: Sequence[str]) -> set[int]:
    """Rows whose world already appeared earlier in the batch: stepping a cache twice at once would corrupt it."""
    seen: set[str] = set()
    duplicates = set()
    for index, world_id in enumerate(ids):
        if world_id in seen:
            duplicates.add(index)
        seen.add(world_id)
    return duplicates


def batched_config(max_batch_size: int, max_queue_delay_us: int) -> ModelConfig:
    """Dynamic batching: concurrent sessions' requests that arrive within the delay run as one batch."""
    return ModelConfig(batching=True, max_batch_size=max_batch_size,
                       batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
