"""The Celery app shared by the job API (which sends stages) and the workers (which run them).

Redis is broker and result backend. Stages are acknowledged late and rejected back to the queue if the
worker process is lost; a worker that dies outright has its stage redelivered after the visibility timeout,
and a per-job lease in Redis turns away the duplicate that the timeout sends while a live worker still runs it.
"""

from __future__ import annotations

from celery import Celery

RUN_STAGE = "genie.run_stage"


def make_app(redis_url: str, queue: str, visibility_timeout_s: float = 300.0) -> Celery:
    app = Celery("genie", broker=redis_url, backend=redis_url)
    transport = {"visibility_timeout": visibility_timeout_s,
                 # Look for abandoned stages often enough that recovery takes ~ the visibility timeout, not 100 s.
                 "unacked_restore_interval": max(1, int(visibility_timeout_s / 4)), "unacked_restore_throttle": 1}
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        broker_transport_options=transport, result_backend_transport_options=transport,
        task_default_queue=queue, task_serializer="json", result_serializer="json", accept_content=["json"],
        result_expires=7 * 24 * 3600, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def enqueue_stage(app: Celery, job_id: str, stage: str, queue: str, countdown: float | None = None) -> None:
    app.send_task(RUN_STAGE, args=[job_id, stage], queue=queue, countdown=countdown)
