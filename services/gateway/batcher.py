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

from services.backends.base import ModelBackend, StepResult, WorldsNotCached, WorldStep

log = logging.getLogger(__name__)


@dataclass
class PendingStep:
    step: WorldStep
    rebuild: Callable[[], None]  # restarts this world's backend caches from its history
    on_result: Callable[[StepResult], None]  # commits the step to the world before the caller wakes
    on_done: Callable[[], None]  # always runs last (releases the world for its next step)
    future: Future = field(default_factory=Future)


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
        try:
            results = self._step_rebuilding_lost(batch)
        except Exception as error:  # noqa: BLE001 - handed to every caller of the batch; this thread must live on
            log.warning("batch of %d steps on %s failed: %s", len(batch), self.model, error)
            for pending in batch:
                pending.on_done()
                pending.future.set_exception(error)
            return
        for pending, result in zip(batch, results):
            pending.on_result(result)
            pending.on_done()
            pending.future.set_result(result)

    def _step_rebuilding_lost(self, batch: list[PendingStep]) -> list[StepResult]:
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
