"""The genie.v1 gRPC server of the gateway: a thin servicer over Gateway, plus health, reflection, metrics.

Domain errors become status codes in `status_for` only; `GatewayRuntime` starts and drains the whole thing.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services import registry
from services.backends.base import BackendError, ModelBackend
from services.gateway import convert
from services.gateway.errors import (DeadlineExceeded, InvalidArgument, NotFound,
                                     ResourceExhausted, Unavailable)
from services.gateway.gateway import Gateway
from services.metrics import GatewayMetrics, MetricsServer, serve_metrics
from services.settings import GatewaySettings

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorldService"].full_name

_STATUS = {InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
           ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
           DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED, Unavailable: grpc.StatusCode.UNAVAILABLE,
           BackendError: grpc.StatusCode.UNAVAILABLE}


def status_for(error: Exception) -> grpc.StatusCode:
    """The one place domain and backend errors become gRPC status codes."""
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return grpc.StatusCode.INTERNAL


def _abort(method: str, error: Exception, context: grpc.ServicerContext, metrics: GatewayMetrics) -> None:
    code = status_for(error)
    metrics.rpc_errors.labels(method, code.name).inc()
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=error)
    context.abort(code, str(error) if code is not grpc.StatusCode.INTERNAL else f"internal error: {error!r}")


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: "WorldServicer", request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every failure leaves as a status code, never a crash
            _abort(method.__name__, error, context, self.metrics)
    return wrapper


class WorldServicer(world_pb2_grpc.WorldServiceServicer):
    def __init__(self, gateway: Gateway, metrics: GatewayMetrics):
        self.gateway, self.metrics = gateway, metrics

    @_unary
    def CreateWorld(self, request: pb.CreateWorldRequest, context) -> pb.CreateWorldResponse:
        output_format = convert.frame_format(request.output_format, pb.FRAME_FORMAT_RAW_RGB)
        self.gateway.model(request.model)  # an unknown model is reported before the image is decoded
        image = convert.prompt_image(request.prompt, self.gateway.image_limits)
        world, frame = self.gateway.create_world(request.model, image, convert.sampling_request(request.sampling),
                                                 output_format)
        return pb.CreateWorldResponse(world=convert.world_message(world),
                                      frame=convert.frame_message(frame.pixels, output_format))

    @_unary
    def StepWorld(self, request: pb.StepWorldRequest, context) -> pb.StepWorldResponse:
        frame = self.gateway.step_world(request.world_id, request.action, context.time_remaining())
        return convert.step_response(frame, self.gateway.get_world(request.world_id), request.format)

    def Play(self, request_iterator: Iterator[pb.PlayRequest], context) -> Iterator[pb.PlayResponse]:
        try:
            yield from self._play(request_iterator, context)
        except Exception as error:  # noqa: BLE001 - as in _unary, for the stream
            _abort("Play", error, context, self.metrics)

    def _play(self, request_iterator: Iterator[pb.PlayRequest], context) -> Iterator[pb.PlayResponse]:
        world_id = ""
        for request in request_iterator:
            if not world_id:
                if not request.world_id:
                    raise InvalidArgument("the first Play message must set world_id")
                world_id = request.world_id
            elif request.world_id and request.world_id != world_id:
                raise InvalidArgument(f"this Play stream plays world {world_id!r}; open another stream "
                                      f"for {request.world_id!r}")
            frame = self.gateway.step_world(world_id, request.action, context.time_remaining())
            response = convert.step_response(frame, self.gateway.get_world(world_id), request.format)
            yield pb.PlayResponse(world_id=world_id, frame=response.frame, step=response.step)

    @_unary
    def GetWorld(self, request: pb.GetWorldRequest, context) -> pb.World:
        return convert.world_message(self.gateway.get_world(request.world_id))

    @_unary
    def ListWorlds(self, request: pb.ListWorldsRequest, context) -> pb.ListWorldsResponse:
        return pb.ListWorldsResponse(worlds=[convert.world_message(w) for w in self.gateway.list_worlds()])

    @_unary
    def CloseWorld(self, request: pb.CloseWorldRequest, context) -> pb.CloseWorldResponse:
        self.gateway.close_world(request.world_id)
        return pb.CloseWorldResponse()

    @_unary
    def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_message(m) for m in self.gateway.models()])


def build_backend(settings: GatewaySettings) -> ModelBackend:
    """The backend plugin named by settings.backend (entry point group genie.backends)."""
    return registry.get("backends", settings.backend)(settings)


class GatewayRuntime:
    """A running gateway: backend, domain, gRPC server (with health + reflection) and metrics endpoint."""

    def __init__(self, settings: GatewaySettings, backend: ModelBackend | None = None):
        self.settings = settings
        self.backend = backend if backend is not None else build_backend(settings)
        self.metrics = GatewayMetrics()
        self.gateway = Gateway(settings, self.backend, self.metrics)
        limit = settings.max_message_bytes
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.rpc_threads),
                                  options=[("grpc.max_receive_message_length", limit),
                                           ("grpc.max_send_message_length", limit)])
        world_pb2_grpc.add_WorldServiceServicer_to_server(WorldServicer(self.gateway, self.metrics), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.port}")
        self.metrics_server: MetricsServer | None = None

    def start(self) -> "GatewayRuntime":
        self.metrics_server = serve_metrics(self.metrics.registry, self.settings.metrics_port, self.settings.host)
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway serving", extra={"port": self.port, "metrics_port": self.metrics_server.port,
                                           "backend": self.settings.backend,
                                           "models": [m.name for m in self.gateway.models()]})
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for grace_s, then stops everything."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s).wait()
        self.gateway.close()
        self.backend.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("gateway stopped")


def serve(settings: GatewaySettings) -> None:
    """Runs the gateway until SIGTERM or SIGINT, then drains in-flight steps and exits."""
    runtime = GatewayRuntime(settings).start()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    runtime.stop()
