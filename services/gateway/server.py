"""The genie.v1 gRPC server of the gateway (grpc.aio): a thin servicer over Gateway, plus health,
reflection, metrics, API-key auth and TLS.

An open Play stream is a coroutine, not a thread; blocking work (image decoding, the model encode on
CreateWorld, the world store) runs on a thread pool and steps on the batcher threads. Domain errors
become status codes in `status_for` only; `GatewayRuntime` runs the event loop and drains it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services import registry
from services.backends.base import BackendError, ModelBackend
from services.gateway import convert, limits
from services.auth import (PLAY, READ, Authenticator, Caller, PermissionDenied, Unauthenticated, add_port,
                           server_credentials)
from services.gateway.auth import StepQuota
from services.gateway.errors import (Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                                     ResourceExhausted, Unavailable)
from services.gateway.gateway import Frame, Gateway
from services.metrics import GatewayMetrics, MetricsServer, serve_metrics
from services.settings import GatewaySettings
from services.stores.catalog import ModelCatalog
from services.worldstore.base import WorldStore, WorldStoreUnavailable

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorldService"].full_name

_STATUS = {InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
           ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
           DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED, Unavailable: grpc.StatusCode.UNAVAILABLE,
           FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION, Aborted: grpc.StatusCode.ABORTED,
           Unauthenticated: grpc.StatusCode.UNAUTHENTICATED, PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
           BackendError: grpc.StatusCode.UNAVAILABLE, WorldStoreUnavailable: grpc.StatusCode.UNAVAILABLE}


def status_for(error: Exception) -> grpc.StatusCode:
    """The one place domain and backend errors become gRPC status codes."""
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return grpc.StatusCode.INTERNAL


async def _abort(method: str, error: Exception, context: grpc.aio.ServicerContext, metrics: GatewayMetrics) -> None:
    code = status_for(error)
    metrics.rpc_errors.labels(method, code.name).inc()
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=error)
    details = str(error) if code is not grpc.StatusCode.INTERNAL else f"internal error: {type(error).__name__}"
    await context.abort(code, details[:1000])


def _rpc(scope: str) -> Callable:
    """Authenticates the call for `scope`, runs the method with its Caller, and maps any failure to a status."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        async def wrapper(self: "WorldServicer", request, context: grpc.aio.ServicerContext):
            try:
                caller = self.auth.caller(context.invocation_metadata() or (), scope)
                return await method(self, caller, request, context)
            except Exception as error:  # noqa: BLE001 - every failure leaves as a status code, never a crash
                await _abort(method.__name__, error, context, self.metrics)
        return wrapper
    return decorate


def _consume_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class WorldServicer(world_pb2_grpc.WorldServiceServicer):
    def __init__(self, gateway: Gateway, metrics: GatewayMetrics, auth: Authenticator, executor: ThreadPoolExecutor):
        self.gateway, self.metrics, self.auth, self.executor = gateway, metrics, auth, executor
        self.quota = StepQuota(gateway.settings.steps_per_second_per_key)

    async def _blocking(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(function, *args))

    @_rpc(PLAY)
    async def CreateWorld(self, caller: Caller, request: pb.CreateWorldRequest, context) -> pb.CreateWorldResponse:
        output_format = convert.frame_format(request.output_format, pb.FRAME_FORMAT_RAW_RGB)
        # An unknown model is reported before decoding; a version not loaded yet loads here (off the event loop).
        await self._blocking(self.gateway.model, limits.model_name(request.model))
        world, frame = await self._blocking(self._create, caller.name, request, output_format)
        return pb.CreateWorldResponse(world=convert.world_message(world.record),
                                      frame=convert.frame_message(frame.pixels, output_format))

    def _create(self, owner: str, request: pb.CreateWorldRequest, output_format: int):
        image = convert.prompt_image(request.prompt, self.gateway.image_limits)
        return self.gateway.create_world(owner, request.model, image, convert.sampling_request(request.sampling),
                                         output_format)

    async def _step(self, caller: Caller, world_id: str, action: int, expected_step: int | None,
                    context: grpc.aio.ServicerContext) -> Frame:
        if self.auth.enabled:
            self.quota.take(caller.name)
        arrived = time.perf_counter()
        future = await self._blocking(self.gateway.submit_step, caller.name, world_id, action, expected_step)
        self.metrics.step_phase.labels("submit").observe(time.perf_counter() - arrived)
        remaining = context.time_remaining()
        timeout = min(self.gateway.settings.step_deadline_s, remaining if remaining is not None else float("inf"))
        waiting = asyncio.wrap_future(future)
        try:  # shield: a caller giving up must not cancel a step that may already be applied
            return await asyncio.wait_for(asyncio.shield(waiting), max(0.0, timeout))
        except asyncio.TimeoutError as error:
            waiting.add_done_callback(_consume_outcome)  # its outcome is in the world store; no one awaits it
            raise DeadlineExceeded("the step did not finish before the deadline; it may still complete: retry "
                                   "with expected_step set to get its frame without stepping twice") from error

    async def _frame(self, frame: Frame, requested_format: int) -> pb.Frame:
        started = time.perf_counter()
        frame_format = convert.frame_format(requested_format, frame.output_format)
        if frame_format == pb.FRAME_FORMAT_PNG:  # compressing is CPU work: off the event loop
            message = await self._blocking(convert.frame_message, frame.pixels, frame_format)
        else:
            message = convert.frame_message(frame.pixels, frame_format)
        self.metrics.step_phase.labels("encode").observe(time.perf_counter() - started)
        return message

    @_rpc(PLAY)
    async def StepWorld(self, caller: Caller, request: pb.StepWorldRequest, context) -> pb.StepWorldResponse:
        world_id = limits.world_id(request.world_id)
        convert.frame_format(request.format, pb.FRAME_FORMAT_RAW_RGB)  # bad format fails before stepping
        expected = request.expected_step if request.HasField("expected_step") else None
        frame = await self._step(caller, world_id, request.action, expected, context)
        return pb.StepWorldResponse(world_id=world_id, step=frame.step, frame=await self._frame(frame, request.format))

    async def Play(self, request_iterator: AsyncIterator[pb.PlayRequest], context) -> AsyncIterator[pb.PlayResponse]:
        try:
            caller = self.auth.caller(context.invocation_metadata() or (), PLAY)
            async for response in self._play(caller, request_iterator, context):
                yield response
        except Exception as error:  # noqa: BLE001 - as in _rpc, for the stream
            await _abort("Play", error, context, self.metrics)

    async def _play(self, caller: Caller, request_iterator: AsyncIterator[pb.PlayRequest],
                    context) -> AsyncIterator[pb.PlayResponse]:
        world_id = ""
        async for request in request_iterator:
            if not world_id:
                if not request.world_id:
                    raise InvalidArgument("the first Play message must set world_id")
                world_id = limits.world_id(request.world_id)
            elif request.world_id and request.world_id != world_id:
                raise InvalidArgument(f"this Play stream plays world {limits.quote(world_id)}; open another stream "
                                      f"for {limits.quote(request.world_id)}")
            convert.frame_format(request.format, pb.FRAME_FORMAT_RAW_RGB)
            expected = request.expected_step if request.HasField("expected_step") else None
            frame = await self._step(caller, world_id, request.action, expected, context)
            yield pb.PlayResponse(world_id=world_id, step=frame.step, frame=await self._frame(frame, request.format))

    @_rpc(READ)
    async def GetWorld(self, caller: Caller, request: pb.GetWorldRequest, context) -> pb.World:
        record = await self._blocking(self.gateway.get_world, caller.name, limits.world_id(request.world_id))
        return convert.world_message(record)

    @_rpc(READ)
    async def ListWorlds(self, caller: Caller, request: pb.ListWorldsRequest, context) -> pb.ListWorldsResponse:
        records = await self._blocking(self.gateway.list_worlds, caller.name)
        return pb.ListWorldsResponse(worlds=[convert.world_message(record) for record in records])

    @_rpc(PLAY)
    async def CloseWorld(self, caller: Caller, request: pb.CloseWorldRequest, context) -> pb.CloseWorldResponse:
        await self._blocking(self.gateway.close_world, caller.name, limits.world_id(request.world_id))
        return pb.CloseWorldResponse()

    @_rpc(READ)
    async def ListModels(self, caller: Caller, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        listings = await self._blocking(self.gateway.models)  # reads the catalog's version lists
        return pb.ListModelsResponse(models=[convert.model_message(listing) for listing in listings])


def build_backend(settings: GatewaySettings, metrics: GatewayMetrics) -> ModelBackend:
    """The backend plugin named by settings.backend (entry point group genie.backends)."""
    return registry.get("backends", settings.backend)(settings, metrics)


def build_store(settings: GatewaySettings) -> WorldStore:
    """The world store plugin named by settings.world_store (entry point group genie.worlds)."""
    return registry.get("worlds", settings.world_store)(settings)


def build_catalog(settings: GatewaySettings) -> ModelCatalog | None:
    """The model catalog in the store of GENIE_STORE_*, when the gateway serves catalog models."""
    if not settings.catalog_models:
        return None
    from services.settings import StoreSettings
    from services.stores import open_store

    store_settings = StoreSettings()
    return ModelCatalog(open_store(store_settings), Path(store_settings.cache_dir))


class GatewayRuntime:
    """A running gateway: backend, world store, domain, the grpc.aio server on its own event-loop thread
    (with health + reflection) and the metrics endpoint. Constructed and driven from ordinary threads."""

    def __init__(self, settings: GatewaySettings, backend: ModelBackend | None = None,
                 store: WorldStore | None = None, catalog: ModelCatalog | None = None):
        self.settings = settings
        self.auth = Authenticator(settings)  # refuses to start without keys unless auth is off
        credentials = server_credentials(settings)
        self.metrics = GatewayMetrics()
        # A part that fails to start (a model service refusing the gateway, a store out of reach) must not leave
        # the parts started before it running: the backend's discovery and lease threads would go on polling.
        with contextlib.ExitStack() as started:
            self.backend = backend if backend is not None else build_backend(settings, self.metrics)
            if backend is None:
                started.callback(self.backend.close)
            self.store = store if store is not None else build_store(settings)
            if store is None:
                started.callback(self.store.close)
            catalog = catalog if catalog is not None else build_catalog(settings)
            self.gateway = Gateway(settings, self.backend, self.metrics, self.store, catalog)
            started.callback(self.gateway.close)
            self.executor = ThreadPoolExecutor(settings.rpc_threads, thread_name_prefix="gateway-io")
            started.callback(self.executor.shutdown, wait=True)
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="gateway-loop", daemon=True)
            self._loop_thread.start()
            started.callback(self._stop_loop)
            self.port = self._run(self._build(credentials))
            started.pop_all()
        self.metrics_server: MetricsServer | None = None

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build(self, credentials: grpc.ServerCredentials | None) -> int:
        limit = self.settings.max_message_bytes
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                               ("grpc.max_send_message_length", limit)])
        servicer = WorldServicer(self.gateway, self.metrics, self.auth, self.executor)
        world_pb2_grpc.add_WorldServiceServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        return add_port(self.server, f"{self.settings.host}:{self.settings.port}", credentials)

    async def _start(self) -> None:
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> "GatewayRuntime":
        try:
            self.metrics_server = serve_metrics(self.metrics.registry, self.settings.metrics_port, self.settings.host)
            self._run(self._start())
        except BaseException:  # `GatewayRuntime(...).start()` leaves the caller nothing to stop it with
            self.stop(grace_s=0)
            raise
        log.info("gateway serving", extra={"port": self.port, "metrics_port": self.metrics_server.port,
                                           "backend": self.settings.backend, "world_store": self.settings.world_store,
                                           "auth": self.settings.auth, "tls": self.settings.tls_cert_file is not None,
                                           "models": [*self.gateway.versions.served_names()]})
        return self

    async def _stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()

    def stop(self, grace_s: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for grace_s, then stops everything."""
        self._run(self._stop(self.settings.shutdown_grace_s if grace_s is None else grace_s))
        self._stop_loop()
        self.gateway.close()
        self.executor.shutdown(wait=True)
        self.backend.close()
        self.store.close()
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
