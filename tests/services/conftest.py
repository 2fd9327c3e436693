"""Fixtures of the serving tests: a tiny saved world and a real gateway on loopback, per backend plugin.

A backend joins the parametrization by adding one entry to GATEWAY_BACKENDS (name -> settings overrides).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from genie_models import DynamicsConfig, DynamicsModel, LAMConfig, LatentActionModel, TokenizerConfig, VideoTokenizer
from genie_models.world_model import WorldModel, dynamics_config_for
from services.gateway.server import GatewayRuntime
from services.settings import GatewaySettings

from tests.services.helpers import MAX_WORLDS, MODEL_NAME, open_channel
from tests.services.redis_server import redis_server
from tests.services.triton_stack import triton_stack

# Gateways the tests start as processes (`genie serve gateway`, `genie serve stack`) run without API keys
# unless a test configures keys itself; auth is on by default everywhere else.
os.environ.setdefault("GENIE_GATEWAY_AUTH", "none")


def tiny_world_model(context_frames: int = 4, seed: int = 0, action_pointer: bool = False) -> WorldModel:
    """seed: another seed gives another world of the same shape (e.g. a second published version).
    action_pointer: a dynamics model with the action pointer (guidance 2 by default), its table random (a
    trained one is not zero), so that action guidance changes frames."""
    torch.manual_seed(seed)
    tokenizer = TokenizerConfig(image_size=32, patch_size=4, d_model=32, num_heads=2, encoder_layers=1,
                                decoder_layers=1, num_codes=64, code_dim=8, context_frames=context_frames)
    lam = LAMConfig(image_size=32, patch_size=8, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1,
                    num_actions=4, context_frames=context_frames)
    pointer = {"copy_window": (1, 1), "action_pointer": True, "action_guidance": 2.0} if action_pointer else {}
    dynamics = dynamics_config_for(tokenizer, lam, DynamicsConfig(d_model=32, num_heads=2, num_layers=2,
                                                                  context_frames=context_frames,
                                                                  num_maskgit_steps=4, **pointer))
    world = WorldModel(VideoTokenizer(tokenizer), LatentActionModel(lam), DynamicsModel(dynamics)).eval()
    if action_pointer:
        torch.nn.init.normal_(world.dynamics.action_pointer.weight, std=0.05)
    return world


@pytest.fixture(scope="session")
def world_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("world")
    tiny_world_model().save(directory, step=0)
    return directory


@contextlib.contextmanager
def inprocess_stack(checkpoint: Path, model_name: str) -> Iterator[dict]:
    yield {"backend": "inprocess", "models": {model_name: str(checkpoint)}}


# Backend name -> context manager (checkpoint dir, model name) yielding GatewaySettings overrides.
GATEWAY_BACKENDS: dict[str, Callable[[Path, str], contextlib.AbstractContextManager[dict]]] = {
    "inprocess": inprocess_stack,
    "triton": triton_stack,  # three real Triton servers on loopback ports
}


def gateway_settings(overrides: dict) -> GatewaySettings:
    """Loopback, free ports, and limits small enough for the tests to reach."""
    values = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "max_worlds": MAX_WORLDS,
              "max_image_bytes": 2**20, "max_image_pixels": 1_000_000, "batch_window_ms": 5.0,
              "shutdown_grace_s": 2.0, "auth": "none"} | overrides
    return GatewaySettings(**values)


@pytest.fixture(scope="session", params=sorted(GATEWAY_BACKENDS))
def gateway(request, world_checkpoint) -> Iterator[GatewayRuntime]:
    """A gateway serving MODEL_NAME over loopback, shared by the session's tests of one backend."""
    with GATEWAY_BACKENDS[request.param](world_checkpoint, MODEL_NAME) as overrides:
        runtime = GatewayRuntime(gateway_settings(overrides)).start()
        yield runtime
        runtime.stop(grace_s=1.0)


@pytest.fixture
def stub(gateway) -> Iterator[world_pb2_grpc.WorldServiceStub]:
    """A client of the shared gateway; worlds a test leaves open are closed after it."""
    channel = open_channel(gateway.port)
    client = world_pb2_grpc.WorldServiceStub(channel)
    yield client
    for world in client.ListWorlds(pb.ListWorldsRequest()).worlds:
        with contextlib.suppress(grpc.RpcError):  # a test's own threads may have closed it meanwhile
            client.CloseWorld(pb.CloseWorldRequest(world_id=world.world_id))
    channel.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A private redis-server on a free loopback port for the session (installed if missing)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
