"""Many sessions at once: cross-session batching, dropped Play streams, and worlds whose caches were lost.

These are the properties that make serving scale without making one session's trouble another's.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from tests.services.helpers import MODEL_NAME, create_request, open_channel, pixels_of

pytestmark = pytest.mark.integration


def _batch_histogram(metrics_port: int) -> tuple[float, float]:
    """(batches of size 1, all batches) from the gateway's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("genie_batch_size"))
    return float(values['genie_batch_size_bucket{le="1.0"}']), float(values["genie_batch_size_count"])


def test_concurrent_sessions_are_stepped_in_shared_batches(stub, gateway):
    worlds = [stub.CreateWorld(create_request(seed=s)).world.world_id for s in range(8)]
    singles_before, total_before = _batch_histogram(gateway.metrics_server.port)
    start = threading.Barrier(len(worlds))
    failures: list[BaseException] = []

    def play(world_id: str) -> None:
        start.wait()
        try:
            for action in range(6):
                stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=action % 4))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=play, args=(w,)) for w in worlds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    singles, total = _batch_histogram(gateway.metrics_server.port)
    assert total - total_before < 8 * 6, "every step ran alone"
    assert total - singles > total_before - singles_before, "no batch held more than one world"
    assert {stub.GetWorld(pb.GetWorldRequest(world_id=w)).step for w in worlds} == {6}


def test_client_dropping_a_play_stream_leaves_its_world_and_others_working(stub, gateway):
    dropped = stub.CreateWorld(create_request(seed=1)).world.world_id
    other = stub.CreateWorld(create_request(seed=2)).world.world_id
    channel = open_channel(gateway.port)
    stream = world_pb2_grpc.WorldServiceStub(channel).Play(
        iter([pb.PlayRequest(world_id=dropped, action=a % 4) for a in range(1000)]))
    next(stream)
    channel.close()  # the client vanishes mid-stream
    time.sleep(0.2)
    assert stub.StepWorld(pb.StepWorldRequest(world_id=other, action=1)).step == 1
    step_before = stub.GetWorld(pb.GetWorldRequest(world_id=dropped)).step
    assert stub.StepWorld(pb.StepWorldRequest(world_id=dropped, action=0)).step == step_before + 1


@pytest.mark.parametrize("steps_before_loss", [3, 9])  # 9 > the kept history: rebuild from a truncated window
def test_world_whose_backend_caches_were_dropped_replays_like_its_twin(stub, gateway, steps_before_loss):
    actions = [(3 * i + 1) % 4 for i in range(steps_before_loss + 5)]
    lost, twin = (stub.CreateWorld(create_request(seed=21)).world.world_id for _ in range(2))

    def step(world_id: str, action: int) -> np.ndarray:
        return pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=action)).frame)

    for index, action in enumerate(actions):
        if index == steps_before_loss:
            gateway.backend.end_world(MODEL_NAME, lost)  # behind the gateway's back, like a service restart
        np.testing.assert_array_equal(step(lost, action), step(twin, action), err_msg=f"step {index + 1}")
