"""Start one Triton model service (tokenizer, lam or dynamics) for one trained world, in this process.

`python -m services.triton KIND --checkpoint DIR --model-name NAME --grpc-port P ...` (or `--catalog` instead of
`--checkpoint`: the model's published versions, loaded on the gateways' request, see versions.py); `genie serve KIND`
calls `run(kind, settings)` here (exit 1 when it cannot serve). Each process gets its own ports and PyTriton workspace.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from pytriton.model_config import Tensor
from pytriton.proxy.types import Request
from pytriton.triton import Triton, TritonConfig

from genie_models.allocator import keep_freed_memory
from genie_models.world_model import WorldModel
from services.backends.base import ModelInfo
from services.backends.inprocess import model_info
from services.compute_thread import ComputeThread
from services.triton import protocol
from services.triton.batching import UNBATCHED, Binding, batched_config
from services.triton.cli import ServiceSettings, parse_args
from services.triton.procfs import TRITONSERVER, children_named, process_alive
from services.triton.versions import ControlQueue, VersionHost, bind, control_binding

logger = logging.getLogger("genie.triton")

# PyTriton puts sockets like <workspace>/dynamics_step_0_0-server.sock in it; Unix socket paths stop at 107 bytes.
MAX_WORKSPACE_CHARS = 60


class ServiceCannotStart(RuntimeError):
    """The service cannot serve (ports taken, tritonserver gone): it exits non-zero so a supervisor restarts it."""


def info_binding(info: ModelInfo, kind: str) -> Binding:
    """A tiny model answering which world (and which part of it) this service serves."""
    payload = np.array([protocol.info_to_json(info, kind)], dtype=object)

    def answer(requests: list[Request]) -> list[dict[str, np.ndarray]]:
        return [{"info": payload} for _ in requests]

    return Binding(protocol.INFO, answer, [Tensor(name="query", dtype=bytes, shape=(1,))],
                   [Tensor(name="info", dtype=bytes, shape=(1,))], UNBATCHED)


def build_bindings(kind: str, model: WorldModel, settings: ServiceSettings) -> list[Binding]:
    # Imported here so each service loads only its own model code path.
    batcher = batched_config(settings.max_batch_size, settings.max_queue_delay_us)
    if kind == "tokenizer":
        from services.triton.tokenizer_service import TokenizerService
        service = TokenizerService(model.tokenizer, settings.max_worlds, settings.device)
        return service.bindings(batcher)
    if kind == "lam":
        from services.triton.lam_service import LatentActionService
        return LatentActionService(model.lam, settings.device).bindings()
    if kind == "dynamics":
        from services.triton.dynamics_service import DynamicsService
        return DynamicsService(model.dynamics, settings.max_worlds, settings.device).bindings(batcher)
    raise ValueError(f"unknown service kind {kind!r}; kinds are {', '.join(protocol.SERVICE_KINDS)}")


def world_bindings(kind: str, model: WorldModel, settings: ServiceSettings, name: str,
                   compute: ComputeThread) -> list[Binding]:
    """Every Triton model of this service for one loaded world (name: what its `info` answer calls it), each
    answered on the compute thread (PyTriton calls each model's function from a thread of its own)."""
    bindings = compute.run(build_bindings, kind, model, settings)  # allocates the caches: torch work too
    return [replace(binding, infer=compute.wrap(binding.infer))
            for binding in [info_binding(model_info(model, name), kind), *bindings]]


def catalog_bindings(kind: str, settings: ServiceSettings, compute: ComputeThread) -> Callable[[int], list[Binding]]:
    """version -> its bindings, fetched (and sha256-checked) from the catalog of GENIE_STORE_*."""
    from services.settings import StoreSettings
    from services.stores import open_store
    from services.stores.catalog import ModelCatalog

    store_settings = StoreSettings()
    catalog = ModelCatalog(open_store(store_settings), Path(store_settings.cache_dir))

    def load(version: int) -> list[Binding]:
        model, directory = catalog.load(f"{settings.model_name}@{version}")  # the download stays off it
        world = compute.run(WorldModel.load, directory, device=settings.device)
        return world_bindings(kind, world, settings, model.ref, compute)

    return load


def triton_config(settings: ServiceSettings) -> TritonConfig:
    tls = {}
    if settings.tls_cert is not None:
        tls = {"grpc_use_ssl": True, "grpc_server_cert": str(settings.tls_cert), "grpc_server_key": str(settings.tls_key)}
        if settings.tls_client_ca is not None:
            tls |= {"grpc_use_ssl_mutual": True, "grpc_root_cert": str(settings.tls_client_ca)}
    return TritonConfig(grpc_port=settings.grpc_port, http_port=settings.http_port,
                        metrics_port=settings.metrics_port, grpc_address=settings.address,
                        http_address=settings.http_bind_address(), metrics_address=settings.address,
                        allow_metrics=True, allow_gpu_metrics=settings.device.startswith("cuda"),
                        exit_timeout_secs=3, **tls)  # exit_timeout: also how long an orphaned tritonserver holds our ports


def log_http_endpoint(settings: ServiceSettings) -> None:
    """Says where plaintext HTTP (health, /v2 inference) listens, and warns when it is open beside TLS gRPC: an
    operator reading the start-up log sees whether a way around TLS is open."""
    address = settings.http_bind_address()
    if settings.http_exposed_beside_tls():
        logger.warning("plaintext HTTP (health, /v2 inference) on %s:%d is reachable from other hosts although gRPC "
                       "requires TLS: drop --http-address to keep it on loopback", address, settings.http_port)
    else:
        logger.info("plaintext HTTP (health, /v2 inference) on %s:%d%s", address, settings.http_port,
                    " only (gRPC serves TLS)" if settings.tls_cert is not None else "")


def use_own_libpython() -> None:
    """Put this interpreter's libpython first for the Triton Python-backend stub, which PyTriton starts with
    a copy of our environment; a system libpython of another patch release breaks it (ENVIRONMENT.md)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if libdir and paths[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, *paths]))


def port_is_free(address: str, port: int) -> bool:
    """Whether a listening socket could bind address:port now (without SO_REUSEPORT, so a live holder counts)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def wait_for_free_ports(settings: ServiceSettings) -> None:
    """Waits up to settings.port_wait_s for our ports: a killed instance's tritonserver keeps them a few
    seconds. Tritonserver itself would fail to bind and PyTriton would then wait 120 s for it; fail now."""
    ports = {"grpc": settings.grpc_port, "http": settings.http_port, "metrics": settings.metrics_port}
    deadline = time.monotonic() + settings.port_wait_s
    while busy := {name: port for name, port in ports.items() if port and not port_is_free(settings.address, port)}:
        if time.monotonic() > deadline:
            listed = ", ".join(f"{name} {port}" for name, port in busy.items())
            raise ServiceCannotStart(f"port(s) {listed} on {settings.address} still in use after "
                                     f"{settings.port_wait_s:g} s; stop whatever holds them (another service, or a "
                                     f"killed service's tritonserver) or choose other ports")
        time.sleep(0.2)


class TritonWatch(threading.Thread):
    """Ends the process (status 1) when our tritonserver child exits without being asked to (crash, bind
    failure, OOM kill). PyTriton's start-up would wait 120 s for a server that is gone, and its clean-up
    after one hung for over a minute trying to unload models from it (measured); there is nothing left to
    serve with, so exit at once and let the supervisor start a fresh process."""

    def __init__(self, kind: str, stop: "StopRequest", clean_up: Callable[[], None], period_s: float = 0.5):
        super().__init__(name="triton-watch", daemon=True)
        self.kind, self.stop, self.clean_up, self.period_s = kind, stop, clean_up, period_s

    def run(self) -> None:
        server = None
        while not self.stop.requested:
            time.sleep(self.period_s)
            if server is None:
                server = next(iter(children_named(os.getpid(), TRITONSERVER)), None)
            elif not process_alive(server) and not self.stop.requested:
                exit_cannot_serve(self.kind, f"tritonserver (pid {server}) exited on its own", self.clean_up)


def exit_cannot_serve(kind: str, reason: object, clean_up: Callable[[], None] = lambda: None,
                      traceback: bool = False) -> None:
    """One clear log line, then exit 1 now. os._exit: a failed PyTriton start leaves threads that keep a
    process alive, and its clean-up can hang on a dead server."""
    logger.error("the %s service cannot serve, exiting with status 1: %s", kind, reason, exc_info=traceback)
    clean_up()
    logging.shutdown()
    os._exit(1)


class StopRequest:
    """SIGTERM/SIGINT mean "stop": remembered (so an exit of tritonserver is told apart from one we asked for)
    and raised as KeyboardInterrupt, on which Triton.serve() stops the server cleanly."""

    def __init__(self):
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        raise KeyboardInterrupt


def serve(kind: str, settings: ServiceSettings) -> None:
    """Load the world, bind its Triton models and serve until SIGTERM/SIGINT (then stop gracefully).
    Raises ServiceCannotStart when the ports stay taken or tritonserver exits on its own."""
    if not protocol.MODEL_NAME_PATTERN.match(settings.model_name):
        raise ValueError(f"model name {settings.model_name!r} must match {protocol.MODEL_NAME_PATTERN.pattern}")
    stop = StopRequest()
    log_http_endpoint(settings)
    wait_for_free_ports(settings)
    controls = ControlQueue()
    compute = ComputeThread()
    if settings.checkpoint is not None:
        model = compute.run(WorldModel.load, settings.checkpoint, device=settings.device)
    else:  # --catalog: only the control model to start with; versions are bound when a gateway asks
        load_version = catalog_bindings(kind, settings, compute)
    # PyTriton refuses an existing workspace dir; a private parent keeps concurrent processes apart.
    parent = Path(tempfile.mkdtemp(prefix=f"genie-{kind}-", dir=settings.workspace_root))
    if len(str(parent)) > MAX_WORKSPACE_CHARS:
        shutil.rmtree(parent)
        raise ValueError(f"workspace {parent} is too long for the Unix sockets PyTriton makes in it; "
                         f"pass a --workspace-root of at most {MAX_WORKSPACE_CHARS - 25} characters")
    use_own_libpython()
    TritonWatch(kind, stop, lambda: shutil.rmtree(parent, ignore_errors=True)).start()
    try:
        with Triton(config=triton_config(settings), workspace=parent / "ws") as triton:
            host = (VersionHost(kind, triton, load_version, settings.hold_lease_s) if settings.checkpoint is None
                    else None)
            bindings = (world_bindings(kind, model, settings, settings.model_name, compute) if host is None
                        else [control_binding(controls, host)])
            for binding in bindings:
                bind(triton, binding.name, binding)
            logger.info("serving %s of world %r on grpc :%d", kind, settings.model_name, settings.grpc_port)
            # Until SIGTERM/SIGINT (KeyboardInterrupt), or PyTriton finds the server or a model proxy dead. Our own
            # loop, not triton.serve(): versions are bound here, between liveness checks, because a model bound but
            # not yet loaded counts as dead to that check.
            while triton.is_alive():
                controls.run_next(timeout_s=1.0)
                if host is not None:
                    host.release_lapsed()
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    if not stop.requested:
        raise ServiceCannotStart("Triton stopped serving on its own (tritonserver or a model's proxy died)")


def run(kind: str, settings: ServiceSettings) -> None:
    """serve(), and exit 1 with one clear log line when the service cannot serve, so a supervisor or Kubernetes
    restarts it."""
    try:
        serve(kind, settings)
    except KeyboardInterrupt:
        return  # SIGTERM/SIGINT before Triton started: a requested stop, not a failure
    except Exception as error:  # noqa: BLE001 - every failure to serve must end the process, non-zero
        exit_cannot_serve(kind, error, traceback=not isinstance(error, ServiceCannotStart))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m services.triton KIND ...` and `genie serve KIND ...` (via services/triton/cli.py)."""
    keep_freed_memory()
    kind, settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(kind, settings)
