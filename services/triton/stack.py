"""The three Triton model services of one world (tokenizer, lam, dynamics) as child processes.

`ServiceStack` starts them, waits until Triton says every model is ready, tells the gateway where they
listen and stops them (SIGTERM, then SIGKILL after a timeout). `genie serve stack` (supervisor.py: the
services plus a gateway, restarted when they die), the serving benchmark and the integration tests all use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services import die_with_parent
from services.triton import probe, protocol
from services.triton.cli import ServerTLS
from services.triton.client import ClientTLS
from services.triton.procfs import TRITONSERVER, children_named

logger = logging.getLogger("genie.stack")

START_ATTEMPTS = 3  # a service that exits while starting (a port taken meanwhile, memory) is started again
READY_TIMEOUT_S = 300.0  # Triton loads each Python-backend model in seconds; a loaded machine took over 120 s
HEALTH_TIMEOUT_S = 5.0  # one readiness call; a frozen server must not hold wait_ready past its deadline
STOP_TIMEOUT_S = 45.0  # a graceful Triton stop takes ~5 s; a loaded machine needed over 20 s (measured)
# Fixed layout of `genie serve stack`: dynamics on base+0..2, tokenizer base+10..12, lam base+20..22
# (http, grpc, metrics), the same ports as the examples of services/triton/README.md for base 8000.
PORT_OFFSETS = {"dynamics": 0, "tokenizer": 10, "lam": 20}
SHARED_MEMORY = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class ServicePorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls) -> "ServicePorts":
        return cls(grpc=free_port(), http=free_port(), metrics=free_port())

    @classmethod
    def fixed(cls, kind: str, base_port: int) -> "ServicePorts":
        first = base_port + PORT_OFFSETS[kind]
        return cls(http=first, grpc=first + 1, metrics=first + 2)


def stack_ports(base_port: int) -> dict[str, ServicePorts]:
    """The fixed layout from base_port, or free loopback ports for every service when base_port is 0."""
    if base_port == 0:
        return {kind: ServicePorts.free() for kind in protocol.SERVICE_KINDS}
    return {kind: ServicePorts.fixed(kind, base_port) for kind in protocol.SERVICE_KINDS}


def service_environment(torch_threads: int | None = None) -> dict[str, str]:
    """The Python backend stub must load this interpreter's libpython, not the system one (ENVIRONMENT.md)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library_path = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    threads = {} if torch_threads is None else {"OMP_NUM_THREADS": str(torch_threads)}
    return os.environ | {"LD_LIBRARY_PATH": library_path} | threads


def start_child(command: list[str], env: dict[str, str], log: IO | None = None) -> subprocess.Popen:
    """A child in its own process group (a terminal's Ctrl-C reaches only us, and we stop it in order) that gets
    SIGTERM when the thread that started it dies, so a crashed or killed parent leaves no service behind
    (PyTriton does the same for Triton)."""
    return subprocess.Popen(die_with_parent.command(command, signal.SIGTERM), stdout=log,
                            stderr=subprocess.STDOUT if log else None, env=env, process_group=0)


def wait_or_kill(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Waits for a child asked to stop, SIGKILLs it if it lingers past the timeout; returns the exit code.
    Never signals twice: a second SIGTERM would interrupt a Triton service's graceful shutdown."""
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    kill_group(process)
    return code


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILLs what is left of an exited child's process group: a Triton service's tritonserver and its
    Python-backend stubs outlive a SIGKILLed service for seconds (their parent-death signal is a graceful
    SIGTERM), holding its ports and accepting requests nobody answers. The group id stays ours while any
    member lives, so this cannot hit an unrelated process. Then frees the shared memory it left behind."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    release_shared_memory(process.pid)


def release_shared_memory(pid: int) -> None:
    """Deletes the PyTriton tensor-store segments (/dev/shm/pytrtion<pid>-*) of a service that died: a
    graceful stop deletes them, a SIGKILL leaves 16-20 MB per service in RAM-backed /dev/shm, which fills
    a container's 64 MB default after a few crashes and then no service can start (measured: 4-5 segments
    of 4 MiB per killed service). Call only once pid has exited."""
    for segment in SHARED_MEMORY.glob(f"pytrtion{pid}-*"):
        segment.unlink(missing_ok=True)


@dataclass(frozen=True)
class ServiceOptions:
    """What every service of a stack shares (see `python -m services.triton --help`)."""

    address: str = "127.0.0.1"
    max_worlds: int = 256
    max_queue_delay_us: int = 500
    device: str = "cpu"
    workspace_root: Path | None = None
    torch_threads: int | None = None  # OMP_NUM_THREADS of each service; None inherits ours
    environment: dict[str, str] = field(default_factory=dict)  # more variables, e.g. GENIE_STORE_* for a catalog
    hold_lease_s: float | None = None  # catalog services: their --hold-lease-s (None: the service's default)
    port_wait_s: float | None = None  # their --port-wait-s: how long a start waits for its ports (None: default)
    tls: ServerTLS | None = None  # serve gRPC over TLS
    client_tls: ClientTLS | None = None  # how our probes and the stack's gateway reach TLS services


class ServiceExited(RuntimeError):
    """A service process ended while we waited for it to become ready."""


class TritonService:
    """One `python -m services.triton KIND` process; keeps its ports across restarts so clients reconnect.

    Its output goes to log_path (appended) or, without one, to our own stdout and stderr."""

    def __init__(self, kind: str, checkpoint: Path | None, model_name: str, ports: ServicePorts,
                 options: ServiceOptions = ServiceOptions(), log_path: Path | None = None):
        """checkpoint None: the service serves model_name's published versions (--catalog)."""
        self.kind, self.ports, self.options, self.log_path = kind, ports, options, log_path
        source = ["--catalog"] if checkpoint is None else ["--checkpoint", str(checkpoint)]
        # A catalog service starts with only its control model; versions are bound when a gateway asks.
        self.ready_models = (protocol.CONTROL,) if checkpoint is None else protocol.MODELS_BY_KIND[kind]
        self.command = [sys.executable, "-m", "services.triton", kind, *source,
                        "--model-name", model_name, "--address", options.address,
                        "--grpc-port", str(ports.grpc), "--http-port", str(ports.http),
                        "--metrics-port", str(ports.metrics), "--max-worlds", str(options.max_worlds),
                        "--max-queue-delay-us", str(options.max_queue_delay_us), "--device", options.device]
        if options.workspace_root is not None:
            self.command += ["--workspace-root", str(options.workspace_root)]
        if options.port_wait_s is not None:
            self.command += ["--port-wait-s", str(options.port_wait_s)]
        if checkpoint is None and options.hold_lease_s is not None:
            self.command += ["--hold-lease-s", str(options.hold_lease_s)]
        if options.tls is not None:
            self.command += options.tls.arguments()
        self.process: subprocess.Popen | None = None
        self.stopping = False  # SIGTERM sent

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.options.address in ("0.0.0.0", "") else self.options.address

    @property
    def url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def start(self) -> None:
        with contextlib.ExitStack() as files:
            log: IO | None = files.enter_context(open(self.log_path, "ab")) if self.log_path else None
            environment = service_environment(self.options.torch_threads) | self.options.environment
            self.process = start_child(self.command, environment, log)
        self.stopping = False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until our process runs its own tritonserver and Triton's health endpoint and every model of this service
        say ready. Health alone is not enough: a killed predecessor's tritonserver answers on these ports (ready)
        until its parent-death SIGTERM is handled, then takes requests nobody answers (CI saw a restarted service
        "ready" in no time and its first step time out); ours is started only once those ports are free."""
        deadline = time.monotonic() + timeout_s
        with contextlib.closing(self._client()) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    kill_group(self.process)
                    raise ServiceExited(f"{self.kind} service exited ({self.process.returncode}){self._log_hint()}")
                if children_named(self.process.pid, TRITONSERVER):
                    with contextlib.suppress(InferenceServerException):
                        if client.is_server_ready(client_timeout=HEALTH_TIMEOUT_S) and all(
                                client.is_model_ready(name, client_timeout=HEALTH_TIMEOUT_S)
                                for name in self.ready_models):
                            return
                time.sleep(0.3)
        raise TimeoutError(f"{self.kind} service not ready after {timeout_s} s{self._log_hint()}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _client(self) -> grpcclient.InferenceServerClient:
        tls = self.options.client_tls
        return grpcclient.InferenceServerClient(self.url, **(tls.client_options() if tls else {}))

    def answers(self, timeout_s: float) -> bool:
        """Whether this service's own process answers a request within timeout_s (services/triton/probe.py)."""
        return probe.answers(self.url, timeout_s, self.options.client_tls)

    def terminate(self) -> None:
        """Ask for a graceful Triton shutdown (SIGTERM, once) without waiting for it."""
        if self.running() and not self.stopping:
            self.process.send_signal(signal.SIGTERM)
            self.stopping = True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL if it lingers past the timeout; returns the exit code."""
        if self.process is None:
            return None
        self.terminate()
        return wait_or_kill(self.process, timeout_s)

    def exit_code(self) -> int | None:
        """None while it runs (or was never started), else how it ended."""
        return None if self.process is None else self.process.poll()

    def kill(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Crash it (SIGKILL), and its tritonserver with it as `genie serve stack` does; wait for the ports."""
        self.process.kill()
        self.process.wait()
        kill_group(self.process)
        deadline = time.monotonic() + timeout_s
        while any(port_in_use(port, self.host) for port in (self.ports.grpc, self.ports.http, self.ports.metrics)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} service's ports still busy {timeout_s} s after SIGKILL")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _log_hint(self) -> str:
        return f":\n{self.log_tail()}" if self.log_path else " (its log is above)"


def wait_ready_or_restart(service: TritonService, timeout_s: float = READY_TIMEOUT_S,
                          attempts: int = START_ATTEMPTS) -> None:
    """Waits for a started service; one that exits meanwhile is started again (after 1 s, 2 s, ...) until it
    has been started `attempts` times, then ServiceExited is raised with its log."""
    for attempt in range(1, attempts + 1):
        try:
            return service.wait_ready(timeout_s)
        except ServiceExited as exited:
            if attempt == attempts:
                raise
            logger.warning("%s; starting it again (attempt %d of %d)", exited, attempt + 1, attempts)
            time.sleep(attempt)
            service.start()


class ServiceStack:
    """The tokenizer, lam and dynamics services of one world model, started and stopped together.

    checkpoint None: the services serve model_name's published versions from the catalog (--catalog; store settings
    in options.environment or our own GENIE_STORE_*). ports: kind -> ServicePorts (default: free loopback ports);
    log_dir: one <kind>.log each (default: our own output)."""

    def __init__(self, checkpoint: Path | None, model_name: str, options: ServiceOptions = ServiceOptions(),
                 ports: dict[str, ServicePorts] | None = None, log_dir: Path | None = None):
        if not protocol.MODEL_NAME_PATTERN.match(model_name):
            raise ValueError(f"model name {model_name!r} must match {protocol.MODEL_NAME_PATTERN.pattern}")
        self.model_name, self.catalog, self.options = model_name, checkpoint is None, options
        ports = ports or stack_ports(0)
        checkpoint = None if checkpoint is None else Path(checkpoint)
        self.services = {kind: TritonService(kind, checkpoint, model_name, ports[kind], options,
                                             Path(log_dir) / f"{kind}.log" if log_dir else None)
                         for kind in protocol.SERVICE_KINDS}

    def start(self, timeout_s: float = READY_TIMEOUT_S, attempts: int = START_ATTEMPTS) -> "ServiceStack":
        """Starts every service; one that exits while starting is started again, up to `attempts` times."""
        for service in self.services.values():  # start all first: they load in parallel
            service.start()
        try:
            for service in self.services.values():
                wait_ready_or_restart(service, timeout_s, attempts)
        except BaseException:  # not ready, or interrupted while waiting: leave no process behind
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int | None]:
        """Stops all at once (each takes seconds to unload its models); returns each one's exit code."""
        for service in self.services.values():
            service.terminate()
        return {kind: service.stop(timeout_s) for kind, service in self.services.items()}

    def restart(self, kind: str) -> None:
        self.services[kind].stop()
        self.services[kind].start()
        self.services[kind].wait_ready()

    def overrides(self) -> dict:
        """GatewaySettings fields that point a gateway at this stack."""
        endpoints = {kind: service.url for kind, service in self.services.items()}
        catalog = {"catalog_models": [self.model_name]} if self.catalog else {}
        tls = self.options.client_tls
        tls_files = {} if tls is None else {"triton_tls_ca_file": str(tls.ca_file)} | (
            {} if tls.cert_file is None else {"triton_tls_cert_file": str(tls.cert_file),
                                              "triton_tls_key_file": str(tls.key_file)})
        return {"backend": "triton", "triton_endpoints": {self.model_name: endpoints}} | catalog | tls_files

    def gateway_environment(self) -> dict[str, str]:
        """The same as GENIE_GATEWAY_* variables, for a gateway in its own process."""
        return {f"GENIE_GATEWAY_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
                for name, value in self.overrides().items()}

    def __enter__(self) -> "ServiceStack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
