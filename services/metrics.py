"""Prometheus metrics shared by the services: each service owns a registry and serves it on its metrics port.

Names use base units (`_seconds`, `_total`); a private registry per service keeps tests and embedded use clean.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ReplicaMetrics:
    """The triton backend's replicas of each model service (services/backends/replicas.py)."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["model", "kind"]
        self.known = Gauge("genie_replicas_known", "Replicas discovery lists, per model and service kind", labels,
                           registry=registry)
        self.live = Gauge("genie_replicas_live", "Known replicas not marked down (a call could not reach them or "
                          "got no answer in time; probed until their process answers)", labels, registry=registry)
        self.worlds = Gauge("genie_replica_worlds", "Worlds pinned to each replica (their caches live there)",
                            [*labels, "replica"], registry=registry)
        self.repins = Counter("genie_world_repins", "Worlds moved off a replica that went down or away, each "
                              "rebuilt on a live one from the gateway's history", labels, registry=registry)


class GatewayMetrics:
    """The session gateway's metrics."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.active_worlds = Gauge("genie_active_worlds", "Open worlds on this gateway", registry=self.registry)
        self.steps = Counter("genie_steps", "World steps completed", ["model"], registry=self.registry)
        self.step_latency = Histogram("genie_step_latency_seconds", "Time from a step's arrival to its frame",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rpc_errors = Counter("genie_rpc_errors", "RPCs that ended with a non-OK status",
                                  ["method", "code"], registry=self.registry)
        self.step_phase = Histogram("genie_step_phase_seconds", "Time of each hop of a step in the gateway: "
                                    "submit (validate, hand to the batcher), queue (batch wait), backend, commit "
                                    "(world store), encode (frame message)", ["phase"], buckets=LATENCY_BUCKETS,
                                    registry=self.registry)
        self.batch_size = Histogram("genie_batch_size", "Worlds stepped per backend call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_version_loaded = Gauge("genie_model_version_loaded", "1 for each published model version "
                                          "loaded for serving: the latest, and older ones open worlds still play",
                                          ["model", "version"], registry=self.registry)
        self.model_latest_version = Gauge("genie_model_latest_version", "The published version new worlds of each "
                                          "model get", ["model"], registry=self.registry)
        self.replicas = ReplicaMetrics(self.registry)  # backend=triton

    def track_active_worlds(self, count: Callable[[], int]) -> None:
        self.active_worlds.set_function(count)


class StackMetrics:
    """`genie serve stack`'s supervisor: restarts of its children (gateway, tokenizer, lam, dynamics)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.restarts = Counter("genie_service_restarts", "Children restarted after exiting on their own",
                                ["service"], registry=self.registry)
        self.up = Gauge("genie_service_up", "1 while the child runs, 0 while it waits to be restarted",
                        ["service"], registry=self.registry)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serves /metrics over HTTP on a daemon thread (port 0 picks a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
