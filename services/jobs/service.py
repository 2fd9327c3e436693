"""The genie.v1 JobService: a thin servicer over JobManager (submit, get, list, cancel, watch).

Every call is authenticated (services/auth.py): submit and cancel need the train scope, the rest read. A job
belongs to the key that submitted it; errors map to gRPC codes in one place (`status_for`); every message
says what to send instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
from celery import Celery

from genie.v1 import jobs_pb2 as pb
from genie.v1 import jobs_pb2_grpc
from services.auth import READ, TRAIN, Authenticator, Caller, PermissionDenied, Unauthenticated
from services.jobs.records import STAGES, JobNotFound, JobRecord, JobRecords
from services.jobs.spec import InvalidJob, validate
from services.stores.base import ObjectStore, StoreError, StoreUnavailable
from services.worker.app import enqueue_stage

logger = logging.getLogger(__name__)
_STATES = {"queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING, "succeeded": pb.JOB_STATE_SUCCEEDED,
           "failed": pb.JOB_STATE_FAILED, "cancelled": pb.JOB_STATE_CANCELLED}


class JobManager:
    """The job API's domain logic, free of gRPC.

    With `private` (auth on) a caller sees only the jobs its key submitted: another key's job, or one
    written before jobs had owners, is "not found", exactly as a job that does not exist. Without (auth off,
    every caller is "anonymous") every caller sees every job.
    """

    def __init__(self, records: JobRecords, store: ObjectStore, app: Celery, queue: str, private: bool = True):
        self.records, self.store, self.app, self.queue, self.private = records, store, app, queue, private

    def submit(self, caller: Caller, dataset: str, preset: str, overrides: dict[str, str],
               model_name: str) -> JobRecord:
        spec = validate(self.store, dataset, preset, overrides, model_name)
        record = self.records.create(spec.dataset, spec.preset, spec.model_name, spec.overrides, caller.name)
        enqueue_stage(self.app, record.job_id, STAGES[0], self.queue)
        logger.info("job submitted", extra={"job_id": record.job_id, "owner": caller.name, "dataset": dataset,
                                            "preset": preset})
        return record

    def get(self, caller: Caller, job_id: str) -> JobRecord:
        record = self.records.get(job_id)
        if self.private and record.owner != caller.name:
            raise JobNotFound(f"no job {job_id!r}; list jobs with `genie jobs list`")
        return record

    def list(self, caller: Caller, limit: int) -> list[JobRecord]:
        return self.records.list(limit, owner=caller.name if self.private else None)

    def cancel(self, caller: Caller, job_id: str) -> JobRecord:
        self.get(caller, job_id)  # the owner never changes, so checking first leaves no window
        return self.records.cancel(job_id)

    def watch(self, caller: Caller, job_id: str, poll_s: float, alive) -> Iterator[JobRecord]:
        revision = -1
        while alive():
            record = self.get(caller, job_id)
            if record.revision != revision:
                revision = record.revision
                yield record
            if record.finished:
                return
            time.sleep(poll_s)


def to_proto(record: JobRecord) -> pb.Job:
    return pb.Job(
        job_id=record.job_id, state=_STATES[record.state], stage=STAGES.index(record.stage) + 1,
        dataset=record.dataset, preset=record.preset, model_name=record.model_name,
        overrides={key: str(value) for key, value in record.overrides.items()}, step=record.step,
        total_steps=record.total_steps, losses=record.losses, frames_per_second=record.frames_per_second,
        eta_seconds=record.eta_seconds, last_checkpoint=record.last_checkpoint, error=record.error,
        model_version=str(record.model_version or ""), eval_metrics=record.eval_metrics,
        created_at=record.created_at, updated_at=record.updated_at, attempt=record.attempt,
        resumed_from_step=record.resumed_from_step, message=record.message, owner=record.owner)


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    if isinstance(error, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, str(error)
    if isinstance(error, InvalidJob):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, JobNotFound):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"the store is unavailable, try again: {error}"
    if isinstance(error, StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the job service's log"


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager, auth: Authenticator, watch_poll_s: float):
        self.manager, self.auth, self.watch_poll_s = manager, auth, watch_poll_s

    def _call(self, context: grpc.ServicerContext, function, *args):
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001 - every error becomes a status in status_for
            code, message = status_for(error)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("job service call failed")
            context.abort(code, message)

    def _caller(self, context: grpc.ServicerContext, scope: str) -> Caller:
        return self._call(context, self.auth.caller, context.invocation_metadata() or (), scope)

    def SubmitJob(self, request, context):
        return to_proto(self._call(context, self.manager.submit, self._caller(context, TRAIN), request.dataset,
                                   request.preset, dict(request.overrides), request.model_name))

    def GetJob(self, request, context):
        return to_proto(self._call(context, self.manager.get, self._caller(context, READ), request.job_id))

    def ListJobs(self, request, context):
        records = self._call(context, self.manager.list, self._caller(context, READ), request.limit or 100)
        return pb.ListJobsResponse(jobs=[to_proto(record) for record in records])

    def CancelJob(self, request, context):
        return to_proto(self._call(context, self.manager.cancel, self._caller(context, TRAIN), request.job_id))

    def WatchJob(self, request, context):
        updates = self.manager.watch(self._caller(context, READ), request.job_id, self.watch_poll_s,
                                     context.is_active)
        while True:
            record = self._call(context, next, updates, None)
            if record is None:
                return
            yield to_proto(record)
