"""`genie worker`: a Celery worker consuming the training queue; stages run in child processes, so the
worker's threads only supervise (heartbeats, progress, checkpoint sync, cancel) and stay responsive.
"""

from __future__ import annotations

import socket
import uuid

from services.jobs.records import JobRecords
from services.logs import configure_logging
from services.metrics import serve_metrics
from services.settings import StoreSettings, WorkerSettings
from services.stores.base import open_store
from services.worker.app import make_app
from services.worker.metrics import WorkerMetrics
from services.worker.stages import StageRunner
from services.worker.tasks import StageTask, register_stage_task


def run_worker(settings: WorkerSettings, store_settings: StoreSettings) -> None:
    configure_logging(settings.log_level)
    app = make_app(settings.redis_url, settings.queue, settings.visibility_timeout_s)
    metrics = WorkerMetrics()
    serve_metrics(metrics.registry, settings.metrics_port)
    store = open_store(store_settings)
    records = JobRecords.from_url(settings.redis_url)
    runner = StageRunner(settings, store, records, metrics)
    register_stage_task(app, StageTask(app, settings, runner, records, metrics))
    name = f"genie-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(settings.concurrency), "-Q", settings.queue,
                     "--loglevel", settings.log_level, "--without-gossip", "--without-mingle", "-n", name])
