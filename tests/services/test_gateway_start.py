"""A gateway that cannot start stops what it had started: no backend, batcher or event-loop thread lives on."""

from __future__ import annotations

import socket
import threading

import pytest

from services.gateway.server import GatewayRuntime
from tests.services.conftest import gateway_settings
from tests.services.helpers import MODEL_NAME


def threads_left_by(started: set[threading.Thread]) -> list[str]:
    """Threads alive now that were not in started, but gRPC's asyncio poller: the first aio server starts it for
    the whole process (a gateway started and stopped normally leaves it too)."""
    return [thread.name for thread in threading.enumerate()
            if thread not in started and thread.is_alive() and "_poll_wrapper" not in thread.name]


def test_a_gateway_whose_port_is_taken_fails_and_leaves_no_thread_running(world_checkpoint):
    before = set(threading.enumerate())
    with socket.socket() as taken:  # without SO_REUSEPORT, so gRPC cannot share the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = gateway_settings({"models": {MODEL_NAME: str(world_checkpoint)}, "port": taken.getsockname()[1]})
        with pytest.raises(RuntimeError):  # the backend has loaded its models and started its threads by then
            GatewayRuntime(settings)
    assert threads_left_by(before) == []


def test_a_gateway_whose_metrics_port_is_taken_fails_to_start_and_leaves_no_thread_running(world_checkpoint):
    """Built, then start() fails on the metrics endpoint: everything the construction started is stopped too."""
    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = gateway_settings({"models": {MODEL_NAME: str(world_checkpoint)},
                                     "metrics_port": taken.getsockname()[1]})
        runtime = GatewayRuntime(settings)
        assert threads_left_by(before) != []  # the construction did start threads
        with pytest.raises(OSError):
            runtime.start()
    assert threads_left_by(before) == []
