"""Cross-session step batching: concurrent steps of many worlds of one model become one backend call.

A batch closes batch_window_ms after its first step arrives or at max_batch steps; steps that arrive
while the backend is busy queue up and form the next batch, so load itself grows the batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from services.backends.base import ModelBackend, StepResult, WorldsNotCached, WorldStep

log = logging.getLogger(__name__)


@dataclass
class PendingStep:
    """One world's step in a batch. The future gets commit()'s value, or the error that stopped the step.

    A step that fails leaves its world exactly as before: commit() runs only after the backend
    succeeded, and on any failure on_failure() marks the world for a cache rebuild, because the
    backend may have advanced some worlds of a failed batch (or of a partly failed one) already.
    """

    step: WorldStep
    needs_rebuild: bool  # restart this world's backend caches from its history before stepping
    rebuild: Callable[[], None]
    commit: Callable[[StepResult], Any]  # writes the step to the world (store first) -> the future's value
    on_failure: Callable[[BaseException], None]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0  # the batch's backend call began
    finished_at: float = 0.0  # the backend call returned

    def complete(self, result: StepResult) -> None:
        try:
            value = self.commit(result)
        except BaseException as error:  # noqa: BLE001 - this step fails alone; the batch thread lives on
            self.fail(error)
            return
        self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        self.on_failure(error)
        self.future.set_exception(error)


class StepBatcher:
    """One thread per model that drains a queue of steps into backend.step_worlds batches."""

    def __init__(self, model: str, backend: ModelBackend, window_s: float, max_batch: int,
                 observe_batch: Callable[[int], None]):
        self.model, self.backend = model, backend
        self.window_s, self.max_batch = window_s, max_batch
        self._observe_batch = observe_batch
        self._queue: queue.SimpleQueue[PendingStep | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{model}", daemon=True)
        self._thread.start()

    def submit(self, pending: PendingStep) -> Future:
        self._queue.put(pending)
        return pending.future

    def stop(self) -> None:
        """Finishes the queued steps, then ends the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._collect(first)
            self._execute(batch)
            if stopping:
                return

    def _collect(self, first: PendingStep) -> tuple[list[PendingStep], bool]:
        batch, close_at = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                pending = self._queue.get(timeout=max(0.0, close_at - time.monotonic()))
            except queue.Empty:
                break
            if pending is None:
                return batch, True
            batch.append(pending)
        return batch, False

    def _execute(self, batch: list[PendingStep]) -> None:
        self._observe_batch(len(batch))
        started = time.perf_counter()
        try:
            results = self._step_rebuilding(batch)
        except Exception as error:  # noqa: BLE001 - handed to every caller of the batch; this thread must live on
            log.warning("batch of %d steps on %s failed: %s", len(batch), self.model, error)
            for pending in batch:
                pending.fail(error)
            return
        finished = time.perf_counter()
        for pending, result in zip(batch, results):
            pending.started_at, pending.finished_at = started, finished
            pending.complete(result)

    def _step_rebuilding(self, batch: list[PendingStep]) -> list[StepResult]:
        for pending in batch:
            if pending.needs_rebuild:
                pending.rebuild()
        steps = [pending.step for pending in batch]
        try:
            return self.backend.step_worlds(self.model, steps)
        except WorldsNotCached as lost:
            # A restarted or evicting model service forgot these worlds: rebuild them and retry once.
            log.info("rebuilding %d worlds of %s from history", len(lost.world_ids), self.model)
            for pending in batch:
                if pending.step.world_id in lost.world_ids:
                    pending.rebuild()
            return self.backend.step_worlds(self.model, steps)
