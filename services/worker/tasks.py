"""The stage task: one Celery task per (job, stage). It checks the job record, takes the job's lease, runs the
stage, and sends the next stage; a redelivered task resumes its stage from the last checkpoint in the store.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

from celery import Celery

from genie_models.checkpoints import CheckpointError
from genie_models.data import DatasetError
from services.jobs.records import (CANCELLED, FAILED, QUEUED, RUNNING, STAGES, SUCCEEDED, JobNotFound, JobRecord,
                                   JobRecords)
from services.settings import WorkerSettings
from services.stores.base import StoreError
from services.worker.app import RUN_STAGE, enqueue_stage
from services.worker.metrics import WorkerMetrics
from services.worker.stages import DONE, StageCrashed, StageFailed, StageRunner

logger = logging.getLogger(__name__)
PERMANENT = (StageFailed, StoreError, CheckpointError, DatasetError)


class StageTask:
    """What run_stage does, apart from Celery so it reads top to bottom."""

    def __init__(self, app: Celery, settings: WorkerSettings, runner: StageRunner, records: JobRecords,
                 metrics: WorkerMetrics):
        self.app, self.settings, self.runner, self.records, self.metrics = app, settings, runner, records, metrics
        self.worker = socket.gethostname()

    def __call__(self, job_id: str, stage: str, retry) -> str:
        try:
            job = self.records.get(job_id)
        except JobNotFound:
            return "no such job"
        if job.finished or STAGES.index(job.stage) > STAGES.index(stage):
            return f"skipped: job is {job.state} at stage {job.stage}"
        token = uuid.uuid4().hex
        if not self.records.acquire_lease(job_id, token, self.settings.lease_s):
            # A live worker holds the job (this is the visibility timeout's duplicate): look again later.
            raise retry(countdown=min(self.settings.lease_s, self.settings.visibility_timeout_s / 2))
        lease_lost, stop = threading.Event(), threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job_id, token, lease_lost, stop), daemon=True)
        heartbeat.start()
        started = time.perf_counter()
        self.metrics.stages_running.inc()
        try:
            job = self.records.update(job_id, lambda r: _start(r, stage, self.worker))
            if job.state != RUNNING or job.stage != stage:
                return "skipped"
            try:
                outcome = self.runner.run(job, stage, lease_lost)
            except StageCrashed as error:
                self.metrics.stages_failed.labels(stage, "crashed").inc()
                if job.attempt >= self.settings.max_stage_attempts:
                    return self._fail(job_id, stage, f"{error}; gave up after {job.attempt} attempts")
                message = f"{error}; retrying from the last checkpoint"
                self.records.update(job_id, lambda r: setattr(r, "message", message))
                raise retry(countdown=1)
            except PERMANENT as error:
                self.metrics.stages_failed.labels(stage, type(error).__name__).inc()
                return self._fail(job_id, stage, str(error))
            if outcome != DONE:
                self.records.update(job_id, _stopped)
                return "stopped"
            return self._advance(job_id, stage)
        finally:
            self.metrics.stage_duration.labels(stage).observe(time.perf_counter() - started)
            self.metrics.stages_running.dec()
            stop.set()
            heartbeat.join()
            self.records.release_lease(job_id, token)

    def _advance(self, job_id: str, stage: str) -> str:
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else None

        def change(record: JobRecord) -> bool:
            if record.state != RUNNING:
                return False
            if following is None:
                record.state, record.message = SUCCEEDED, f"published {record.model_name}@{record.model_version}"
            else:
                record.state, record.stage, record.attempt = QUEUED, following, 0
                record.step = record.total_steps = record.resumed_from_step = 0
                record.frames_per_second = record.eta_seconds = 0.0
                record.message = f"{stage} done; {following} queued"
            return True
        # The next stage is sent before the record moves: if this worker dies in between, this stage is
        # redelivered (it resumes at its final checkpoint) and sends it again; the duplicate meets the lease
        # or finds its stage done. Until the record moves, the next stage waits on this task's lease.
        if following is not None:
            enqueue_stage(self.app, job_id, following, self.settings.queue)
        self.records.update(job_id, change)
        return "done"

    def _fail(self, job_id: str, stage: str, message: str) -> str:
        logger.warning("job %s failed in stage %s: %s", job_id, stage, message)

        def change(record: JobRecord) -> bool:
            if record.finished:
                return False
            record.state, record.error, record.message = FAILED, message, f"failed in stage {stage}"
            return True
        self.records.update(job_id, change)
        return "failed"

    def _heartbeat(self, job_id: str, token: str, lost: threading.Event, stop: threading.Event) -> None:
        while not stop.wait(self.settings.lease_s / 3):
            try:
                if not self.records.renew_lease(job_id, token, self.settings.lease_s):
                    lost.set()
                    return
            except Exception as error:  # noqa: BLE001 - a Redis blip: keep trying until the lease runs out
                logger.warning("lease renewal of %s failed: %s", job_id, error)


def _start(record: JobRecord, stage: str, worker: str) -> bool:
    if record.finished or record.stage != stage:
        return False
    record.state, record.attempt = RUNNING, record.attempt + 1
    record.step = record.resumed_from_step = 0  # until this attempt's process reports where it resumed
    record.message = f"{stage} running on {worker} (attempt {record.attempt})"
    return True


def _stopped(record: JobRecord) -> bool:
    if record.state != CANCELLED:
        return False
    record.stopped_at = time.time()
    record.message = (f"cancelled; stage process stopped {record.stopped_at - record.cancel_requested_at:.1f} s "
                      f"after the request; last checkpoint {record.last_checkpoint or 'none'}")
    return True


def register_stage_task(app: Celery, stage_task: StageTask) -> None:
    @app.task(bind=True, name=RUN_STAGE, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def run_stage(self, job_id: str, stage: str) -> str:
        return stage_task(job_id, stage, self.retry)
