"""Prometheus metrics of a training worker (base units); served on GENIE_WORKER_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 3 * 3600, 12 * 3600, 48 * 3600)
PUBLISH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.training_steps = Counter("genie_training_steps", "Training steps completed", ["stage"],
                                      registry=self.registry)
        self.frames_per_second = Gauge("genie_training_frames_per_second", "Training throughput of the running "
                                       "stage (0 when idle)", ["stage"], registry=self.registry)
        self.stage_duration = Histogram("genie_stage_duration_seconds", "Wall time of a stage attempt", ["stage"],
                                        buckets=STAGE_BUCKETS, registry=self.registry)
        self.stages_failed = Counter("genie_stages_failed", "Stage attempts that failed", ["stage", "reason"],
                                     registry=self.registry)
        self.publish_duration = Histogram("genie_publish_duration_seconds", "Time to publish a model version",
                                          buckets=PUBLISH_BUCKETS, registry=self.registry)
        self.checkpoints_synced = Counter("genie_checkpoints_synced", "Run checkpoints uploaded to the store",
                                          ["stage"], registry=self.registry)
        self.stages_running = Gauge("genie_stages_running", "Stages running on this worker", registry=self.registry)
