"""A gateway that cannot start stops what it had started: no backend, batcher or event-loop thread lives on."""

from __future__ import annotations

import socket
import threading

import pytest

from services.gateway.server import GatewayRuntime
from tests.services.conftest import gateway_settings
from tests.services.helpers import MODEL_NAME


def test_a_gateway_whose_port_is_taken_fails_and_leaves_no_thread_running(world_checkpoint):
    before = set(threading.enumerate())
    with socket.socket() as taken:  # without SO_REUSEPORT, so gRPC cannot share the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = gateway_settings({"models": {MODEL_NAME: str(world_checkpoint)}, "port": taken.getsockname()[1]})
        with pytest.raises(RuntimeError):  # the backend has loaded its models and started its threads by then
            GatewayRuntime(settings)
    left = [thread.name for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    assert left == []
