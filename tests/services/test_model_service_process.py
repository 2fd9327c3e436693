"""A Triton model service that cannot serve exits non-zero with one clear log line, so a supervisor restarts it.

Real `genie serve KIND` processes: a port held by another socket, a world that is not there, a tritonserver
killed under a running service.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from services.triton.procfs import TRITONSERVER, children_named, process_alive
from services.triton.stack import ServiceExited, ServicePorts, TritonService, wait_ready_or_restart
from tests.services.helpers import MODEL_NAME
from tests.services.triton_stack import lone_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GENIE = str(Path(sys.executable).parent / "genie")


def serve_command(kind: str, checkpoint: Path, ports: ServicePorts, *extra: str) -> list[str]:
    return [GENIE, "serve", kind, "--checkpoint", str(checkpoint), "--model-name", MODEL_NAME,
            "--address", "127.0.0.1", "--grpc-port", str(ports.grpc), "--http-port", str(ports.http),
            "--metrics-port", str(ports.metrics), *extra]


def run_to_exit(command: list[str], timeout_s: float = 300) -> tuple[int, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    return done.returncode, done.stderr + done.stdout


def test_serve_kind_help_lists_the_service_options():
    done = subprocess.run([GENIE, "serve", "dynamics", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    for option in ("--checkpoint", "--grpc-port", "--max-worlds", "--max-queue-delay-us", "--port-wait-s", "--device"):
        assert option in done.stdout


def test_service_whose_port_is_taken_exits_non_zero_naming_the_port(world_checkpoint):
    ports = ServicePorts.free()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports.grpc))
        holder.listen()
        code, output = run_to_exit(serve_command("dynamics", world_checkpoint, ports, "--port-wait-s", "1"))
    assert code == 1, output  # checked before Triton starts: no 120 s wait for a tritonserver that failed to bind
    assert f"the dynamics service cannot serve, exiting with status 1: port(s) grpc {ports.grpc} on 127.0.0.1 " \
           "still in use after 1 s" in output


def test_service_whose_world_does_not_load_exits_non_zero_with_the_reason(tmp_path):
    code, output = run_to_exit(serve_command("tokenizer", tmp_path / "missing-world", ServicePorts.free()))
    assert code == 1, output
    assert "the tokenizer service cannot serve, exiting with status 1" in output
    assert "missing-world" in output


def test_service_exits_non_zero_when_its_tritonserver_dies(world_checkpoint, tmp_path):
    service = lone_service("lam", world_checkpoint, MODEL_NAME, tmp_path, max_worlds=2)
    service.start()
    try:
        service.wait_ready()
        [server] = children_named(service.process.pid, TRITONSERVER)
        os.kill(server, signal.SIGKILL)
        assert service.process.wait(timeout=120) == 1
        assert "tritonserver (pid" in service.log_tail() and "exited on its own" in service.log_tail()
    finally:
        service.stop()
    assert not process_alive(server)


def test_a_service_is_not_taken_for_ready_on_the_answers_of_another_on_its_ports(world_checkpoint, tmp_path):
    """A SIGKILLed service's tritonserver answers "ready" on its ports for a moment; a replacement started at once
    must not be taken for ready on those answers (CI once sent a restarted service's first step to such a server,
    which never answered). Here the other server stays: the replacement gives up on the ports and says so."""
    serving = lone_service("lam", world_checkpoint, MODEL_NAME, tmp_path, max_worlds=2)
    serving.start()
    try:
        serving.wait_ready()
        replacement = TritonService("lam", world_checkpoint, MODEL_NAME, serving.ports,
                                    replace(serving.options, port_wait_s=1), tmp_path / "replacement.log")
        replacement.start()
        with pytest.raises(ServiceExited, match="still in use"):
            replacement.wait_ready(timeout_s=300)
    finally:
        serving.stop()


def test_a_service_that_exits_while_starting_is_started_again(world_checkpoint, tmp_path):
    """Its port is held at first (so it exits after --port-wait-s) and freed once it has exited."""
    service = lone_service("lam", world_checkpoint, MODEL_NAME, tmp_path, max_worlds=2, port_wait_s=1)
    holder = socket.socket()
    holder.bind(("127.0.0.1", service.ports.grpc))
    holder.listen()

    def free_the_port_once_it_exited() -> None:
        service.process.wait(timeout=300)
        holder.close()

    service.start()
    first = service.process
    watcher = threading.Thread(target=free_the_port_once_it_exited)
    watcher.start()
    try:
        wait_ready_or_restart(service, timeout_s=300, attempts=2)
        assert first.returncode == 1 and service.process is not first
        assert "still in use" in service.log_tail(400)
    finally:
        watcher.join(timeout=300)
        holder.close()
        service.stop()


def test_a_service_that_keeps_exiting_while_starting_is_given_up_with_its_log(tmp_path):
    service = lone_service("lam", tmp_path / "missing-world", MODEL_NAME, tmp_path, max_worlds=2)
    service.start()
    first = service.process
    with pytest.raises(ServiceExited, match="missing-world"):
        wait_ready_or_restart(service, timeout_s=300, attempts=2)
    # Started twice, and both exited. Which way the second went is not asserted: in a long test run, forked
    # while other threads are inside gRPC, it once died at start-up in gRPC before saying why.
    assert service.process is not first and first.returncode == 1 and service.process.returncode != 0
    assert "cannot serve, exiting with status 1" in service.log_tail(400)
