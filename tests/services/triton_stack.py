"""The three Triton model services as real subprocesses on free loopback ports, for integration tests.

`triton_stack(checkpoint, model_name)` yields the GatewaySettings overrides for backend="triton";
`TritonStack` gives tests finer control (stop or restart one service, read its metrics).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.triton import protocol

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def service_environment() -> dict[str, str]:
    """The Python backend stub must load this interpreter's libpython, not the system one (ENVIRONMENT.md)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library_path = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    # Three services share the test machine's cores: one torch thread each avoids oversubscription.
    return os.environ | {"LD_LIBRARY_PATH": library_path, "OMP_NUM_THREADS": "1"}


class TritonService:
    """One `python -m services.triton KIND` process; keeps its ports across restarts so clients reconnect."""

    def __init__(self, kind: str, checkpoint: Path, model_name: str, log_dir: Path, max_worlds: int,
                 workspace_root: Path | None = None):
        self.kind, self.log_path = kind, log_dir / f"{kind}.log"
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.command = [sys.executable, "-m", "services.triton", kind, "--checkpoint", str(checkpoint),
                        "--model-name", model_name, "--address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                        "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
                        "--max-worlds", str(max_worlds), "--max-queue-delay-us", "20000"]
        if workspace_root is not None:
            self.command += ["--workspace-root", str(workspace_root)]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=service_environment(), cwd=Path(__file__).parents[2])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until Triton's own health endpoint and every model of this service say ready."""
        deadline = time.monotonic() + timeout_s
        with contextlib.closing(grpcclient.InferenceServerClient(self.url)) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.kind} service exited ({self.process.returncode}):\n{self.log_tail()}")
                with contextlib.suppress(InferenceServerException):
                    if client.is_server_ready() and all(client.is_model_ready(name)
                                                        for name in protocol.MODELS_BY_KIND[self.kind]):
                        return
                time.sleep(0.3)
        raise TimeoutError(f"{self.kind} service not ready after {timeout_s} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        """Ask for a graceful Triton shutdown (SIGTERM) without waiting for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it lingers past the timeout."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Crash it (SIGKILL) and wait until Triton, which outlives it briefly, has released the ports."""
        self.process.kill()
        self.process.wait()
        deadline = time.monotonic() + timeout_s
        while any(port_in_use(port) for port in (self.grpc_port, self.http_port, self.metrics_port)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} service's ports still busy {timeout_s} s after SIGKILL")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class TritonStack:
    """The tokenizer, lam and dynamics services of one world model, started together."""

    def __init__(self, checkpoint: Path, model_name: str, log_dir: Path, workspace_root: Path, max_worlds: int = 16):
        self.model_name = model_name
        self.services = {kind: TritonService(kind, Path(checkpoint), model_name, Path(log_dir), max_worlds,
                                             workspace_root) for kind in protocol.SERVICE_KINDS}

    def start(self) -> "TritonStack":
        for service in self.services.values():  # start all first: they load in parallel
            service.start()
        try:
            for service in self.services.values():
                service.wait_ready()
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for service in self.services.values():  # all at once: each takes seconds to unload its models
            service.terminate()
        for service in self.services.values():
            service.stop()

    def restart(self, kind: str) -> None:
        self.services[kind].stop()
        self.services[kind].start()
        self.services[kind].wait_ready()

    def overrides(self) -> dict:
        endpoints = {kind: service.url for kind, service in self.services.items()}
        return {"backend": "triton", "triton_endpoints": {self.model_name: endpoints}}


@contextlib.contextmanager
def running_stack(checkpoint: Path, model_name: str, max_worlds: int = 16) -> Iterator[TritonStack]:
    # Workspaces get their own short root (Unix socket paths are short), removed even after a SIGKILL.
    with tempfile.TemporaryDirectory(prefix="genie-triton-test-") as log_dir, \
            tempfile.TemporaryDirectory(prefix="genie-ws-") as workspace_root:
        stack = TritonStack(checkpoint, model_name, Path(log_dir), Path(workspace_root), max_worlds).start()
        try:
            yield stack
        finally:
            stack.stop()


@contextlib.contextmanager
def triton_stack(checkpoint: Path, model_name: str) -> Iterator[dict]:
    """The stack for the gateway tests: yields GatewaySettings overrides selecting backend="triton"."""
    with running_stack(checkpoint, model_name) as stack:
        yield stack.overrides()
