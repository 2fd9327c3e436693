"""World state outlives the gateway: with the redis world store, a gateway killed with SIGKILL mid-soak
is replaced (and joined by a second gateway on the same Redis), and every world plays on bit-identically
to an undisturbed twin on a separate gateway, each request applied at most once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.gateway.server import GatewayRuntime
from tests.services.conftest import gateway_settings, inprocess_stack
from tests.services.helpers import MODEL_NAME, create_request, free_port, pixels_of, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
RECONNECT_FAST = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 500)]


def _start_gateway(checkpoint: Path, port: int, redis_url: str, prefix: str, log: Path) -> subprocess.Popen:
    env = os.environ | {"GENIE_GATEWAY_HOST": "127.0.0.1", "GENIE_GATEWAY_METRICS_PORT": "0",
                        "GENIE_GATEWAY_AUTH": "none", "GENIE_GATEWAY_WORLD_STORE": "redis",
                        "GENIE_GATEWAY_REDIS_URL": redis_url, "GENIE_GATEWAY_WORLD_STORE_PREFIX": prefix,
                        "GENIE_GATEWAY_BATCH_WINDOW_MS": "2"}
    return subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "gateway", "--port", str(port),
                             "--model", f"{MODEL_NAME}={checkpoint}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def _step_until_applied(stub, world_id: str, action: int, expected: int, attempts: list[int]) -> pb.StepWorldResponse:
    """StepWorld with expected_step, retried through restarts: safe, since a retry never steps twice."""
    deadline = time.monotonic() + 120
    while True:
        attempts[0] += 1
        try:
            return stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=action, expected_step=expected),
                                  timeout=10)
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_worlds_step_on_bit_identically_after_the_gateway_is_killed(world_checkpoint, redis_url, tmp_path):
    port, prefix = free_port(), f"kill{time.monotonic_ns()}:"
    actions = [(5 * i + 1) % 4 for i in range(10)]
    first = _start_gateway(world_checkpoint, port, redis_url, prefix, tmp_path / "gateway.log")
    replacement = second = None
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=RECONNECT_FAST)
    with inprocess_stack(world_checkpoint, MODEL_NAME) as overrides:
        twin_runtime = GatewayRuntime(gateway_settings(overrides)).start()  # memory store, its own process state
    twin_channel = grpc.insecure_channel(f"127.0.0.1:{twin_runtime.port}")
    try:
        wait_serving(port, describe=lambda: (tmp_path / "gateway.log").read_text()[-3000:])
        stub, twin = world_pb2_grpc.WorldServiceStub(channel), world_pb2_grpc.WorldServiceStub(twin_channel)
        seeds = range(4)
        worlds = [stub.CreateWorld(create_request(seed=s)).world.world_id for s in seeds]
        twins = [twin.CreateWorld(create_request(seed=s)).world.world_id for s in seeds]
        frames: dict[str, list[np.ndarray]] = {w: [] for w in worlds}
        attempts, failures, progress = [0], [], threading.Semaphore(0)

        def play(world_id: str, count: int, offset: int, client) -> None:
            try:
                for index in range(offset, offset + count):
                    response = _step_until_applied(client, world_id, actions[index], index + 1, attempts)
                    assert response.step == index + 1
                    frames[world_id].append(pixels_of(response.frame))
                    progress.release()
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                failures.append(error)

        threads = [threading.Thread(target=play, args=(w, 8, 0, stub)) for w in worlds]
        for thread in threads:
            thread.start()
        for _ in range(8):  # mid-soak: a quarter of the steps are done
            assert progress.acquire(timeout=120)
        first.kill()  # SIGKILL: no drain, in-flight steps are lost or committed
        first.wait()
        replacement = _start_gateway(world_checkpoint, port, redis_url, prefix, tmp_path / "gateway.log")
        for thread in threads:
            thread.join(timeout=240)
        assert not failures, failures
        # A second gateway on the same Redis takes over the last steps of every world.
        second = GatewayRuntime(gateway_settings(overrides | {"world_store": "redis", "redis_url": redis_url,
                                                              "world_store_prefix": prefix})).start()
        with grpc.insecure_channel(f"127.0.0.1:{second.port}") as second_channel:
            other = world_pb2_grpc.WorldServiceStub(second_channel)
            for world_id in worlds:
                play(world_id, len(actions) - 8, 8, other)
            assert not failures, failures
            assert [w.step for w in other.ListWorlds(pb.ListWorldsRequest()).worlds] == [len(actions)] * len(worlds)
        for world_id, twin_id in zip(worlds, twins):
            for index, action in enumerate(actions):
                want = pixels_of(twin.StepWorld(pb.StepWorldRequest(world_id=twin_id, action=action)).frame)
                np.testing.assert_array_equal(frames[world_id][index], want, err_msg=f"{world_id} step {index + 1}")
        assert attempts[0] > len(worlds) * len(actions), "the kill interrupted no step: the test proved nothing"
    finally:
        if second is not None:
            second.stop(grace_s=0)
        for process in (first, replacement):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        channel.close()
        twin_channel.close()
        twin_runtime.stop(grace_s=0)
