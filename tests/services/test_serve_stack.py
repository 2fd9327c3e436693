"""`genie serve stack`: one world's three Triton services and its gateway from one command, stopped by SIGTERM.

Runs the command as the Makefile's `serve` target does, on free loopback ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from genie.v1 import world_pb2 as pb
from services.client import connect
from tests.services.helpers import MODEL_NAME, create_request, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_TIMEOUT_S = 180.0


def descendants(pid: int) -> dict[int, str]:
    """Every process below pid, by id, with its start time (to tell a reused id apart)."""
    parents, start_times = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parents[int(entry.name)], start_times[int(entry.name)] = int(fields[1]), fields[19]
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child in (p for p, ppid in parents.items() if ppid == parent):
            found[child] = start_times[child]
            frontier.append(child)
    return found


def still_running(processes: dict[int, str]) -> list[int]:
    alive = []
    for pid, start_time in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[19] == start_time and fields[0] != "Z":
            alive.append(pid)
    return alive


def wait_for_gateway(stub, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=2)
            return
        except grpc.RpcError:
            assert server.poll() is None, f"genie serve stack exited with {server.returncode}"
            assert time.monotonic() < deadline, f"the stack was not serving after {START_TIMEOUT_S} s"
            time.sleep(0.5)


def test_serve_stack_serves_a_world_and_stops_cleanly_on_sigterm(world_checkpoint):
    port = free_port()
    genie = Path(sys.executable).parent / "genie"
    command = [str(genie), "serve", "stack", "--world", str(world_checkpoint), "--model-name", MODEL_NAME,
               "--port", str(port), "--metrics-port", "0", "--service-base-port", "0", "--max-worlds", "4"]
    env = os.environ | {"GENIE_GATEWAY_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, env=env)
    try:
        channel, stub = connect(f"127.0.0.1:{port}")
        with channel:
            wait_for_gateway(stub, server)
            assert [model.name for model in stub.ListModels(pb.ListModelsRequest()).models] == [MODEL_NAME]
            world_id = stub.CreateWorld(create_request(seed=3), timeout=60).world.world_id
            for action in (1, 2):
                step = stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=action), timeout=60)
                assert (step.frame.width, step.frame.height) == (32, 32)
            assert step.step == 2
        children = descendants(server.pid)
        assert len(children) >= 4  # three services and the gateway, with Triton servers below the services
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0
        assert still_running(children) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
