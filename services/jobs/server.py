"""`genie serve jobs`: the JobService in its own process, apart from the session gateway.

Training jobs scale, deploy and fail independently of the latency-critical world stepping; the job API only
touches Redis and the store, so it needs no model code, no GPU and no Triton.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from genie.v1 import jobs_pb2_grpc
from services.auth import Authenticator, add_port, server_credentials
from services.jobs.records import STAGES, JobRecords
from services.jobs.service import JobManager, JobServicer
from services.metrics import MetricsServer, serve_metrics
from services.settings import JobsSettings, StoreSettings
from services.stores.base import open_store
from services.worker.app import make_app

logger = logging.getLogger(__name__)
SERVICE_NAME = "genie.v1.JobService"


class JobStateCollector:
    """genie_jobs{state=...}: jobs per state (queued, running, failed, ...), read from Redis at each scrape."""

    def __init__(self, records: JobRecords):
        self.records = records

    def collect(self):
        family = GaugeMetricFamily("genie_jobs", "Training jobs by state", labels=["state"])
        counts = self.records.all_states()
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            family.add_metric([state], counts.get(state, 0))
        yield family


@dataclass
class JobsRuntime:
    server: grpc.Server
    port: int
    metrics: MetricsServer

    def stop(self, grace_s: float) -> None:
        self.server.stop(grace_s).wait()
        self.metrics.close()


def start(settings: JobsSettings, store_settings: StoreSettings) -> JobsRuntime:
    auth = Authenticator(settings)  # refuses to start without keys unless auth is off
    credentials = server_credentials(settings)
    records = JobRecords.from_url(settings.redis_url)
    app = make_app(settings.redis_url, settings.queue)
    manager = JobManager(records, open_store(store_settings), app, settings.queue, private=auth.enabled)
    registry = CollectorRegistry()
    registry.register(JobStateCollector(records))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.rpc_threads))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(manager, auth, settings.watch_poll_s), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Health is served without a key; JobService calls need one.
    port = add_port(server, f"{settings.host}:{settings.port}", credentials)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics = serve_metrics(registry, settings.metrics_port, settings.host)
    logger.info("job service listening", extra={"port": port, "metrics_port": metrics.port, "stages": STAGES,
                                                 "auth": settings.auth, "tls": credentials is not None})
    return JobsRuntime(server, port, metrics)


def serve(settings: JobsSettings, store_settings: StoreSettings) -> None:
    runtime = start(settings, store_settings)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    print(f"job service on port {runtime.port}, metrics on {runtime.metrics.port}", flush=True)
    stopping.wait()
    runtime.stop(settings.shutdown_grace_s)
