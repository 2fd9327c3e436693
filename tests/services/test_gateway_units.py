"""Gateway pieces without a server: prompt decoding, the world registry's limits and idle eviction,
settings from the environment, the CLI wiring, and that the committed genie.v1 stubs are current."""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.gateway.errors import InvalidArgument, NotFound, ResourceExhausted
from services.gateway.prompts import ImageLimits, decode_encoded, decode_raw
from services.gateway.worlds import World, WorldRegistry
from services.settings import GatewaySettings
from services.worldstore.base import WorldRecord
from services.worldstore.memory import MemoryWorldStore
from tests.services.helpers import encoded, picture

PROTOS = Path(__file__).resolve().parents[2] / "protos"
LIMITS = ImageLimits(max_bytes=10_000, max_pixels=2_500)


def test_committed_grpc_stubs_match_a_fresh_generation(tmp_path):
    spec = importlib.util.spec_from_file_location("protos_generate", PROTOS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {f"{name}_pb2{suffix}" for name in ("world", "jobs") for suffix in (".py", ".pyi", "_grpc.py")}
    for path in written:
        committed = PROTOS / path.relative_to(tmp_path)
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run protos/generate.sh"


def test_png_and_jpeg_decode_to_rgb_of_their_size():
    pixels = picture(30, 20)
    np.testing.assert_array_equal(decode_encoded(encoded(pixels, "PNG"), LIMITS), pixels)
    assert decode_encoded(encoded(pixels, "JPEG"), LIMITS).shape == (20, 30, 3)


def test_raw_rgb_is_reshaped_rows_first():
    pixels = picture(5, 3)
    np.testing.assert_array_equal(decode_raw(pixels.tobytes(), 5, 3, LIMITS), pixels)


def test_image_header_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(InvalidArgument, match="51x50 = 2550 pixels"):
        decode_encoded(encoded(np.zeros((50, 51, 3), np.uint8), "PNG"), LIMITS)


def _world(world_id: str, history_frames: int = 3) -> World:
    record = WorldRecord(world_id, "owner", "m", 0, 4, 1.0, 0, step=0, tokens=np.zeros((1, 2, 2), np.int64),
                         actions=np.array([4]), last_frame=np.zeros((4, 4, 3), np.uint8), last_action=-1)
    return World(record, history_frames)


def test_registry_refuses_worlds_beyond_capacity_including_reservations():
    registry = WorldRegistry(max_worlds=2)
    registry.add(_world(registry.reserve()))
    registry.reserve()  # a create in progress holds its place
    with pytest.raises(ResourceExhausted, match="maximum of 2 worlds"):
        registry.reserve()
    registry.release()
    registry.reserve()


def test_registry_reports_only_worlds_idle_past_the_timeout():
    registry = WorldRegistry(max_worlds=4)
    for name in ("old", "new"):
        registry.add(_world(name))
        registry.reserve()
    registry.release()
    old = registry.get("old")
    old.record = replace(old.record, updated_at=old.record.updated_at - 100)
    assert [w.world_id for w in registry.idle(timeout_s=50)] == ["old"]
    registry.remove("old")
    assert registry.get("old") is None


def test_world_history_keeps_only_the_last_frames():
    world = _world("w", history_frames=3)
    for index in range(5):
        world.record = world.advanced(np.full((2, 2), index), index, np.zeros((4, 4, 3), np.uint8))
    tokens, actions = world.history()
    assert tokens.shape == (3, 2, 2) and actions.tolist() == [2, 3, 4] and tokens[0, 0, 0] == 2
    assert world.step_count == 5 and world.record.last_action == 4


def test_gateway_settings_read_prefixed_environment(monkeypatch):
    monkeypatch.setenv("GENIE_GATEWAY_MODELS", '{"coinrun-tiny": "out/demo/world"}')
    monkeypatch.setenv("GENIE_GATEWAY_MAX_WORLDS", "7")
    settings = GatewaySettings()
    assert settings.models == {"coinrun-tiny": "out/demo/world"} and settings.max_worlds == 7
    assert settings.backend == "inprocess" and settings.port == 50051 and settings.host == "127.0.0.1"


def test_cli_registers_serve_gateway_and_client_play(monkeypatch):
    from services.cli import gateway_settings_from, register

    monkeypatch.setenv("GENIE_GATEWAY_MODELS", '{"a": "dir-a"}')
    parser = argparse.ArgumentParser(prog="genie")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "gateway", "--port", "0", "--model", "b=dir-b"])
    settings = gateway_settings_from(args)
    assert settings.port == 0 and settings.models == {"a": "dir-a", "b": "dir-b"}
    play = parser.parse_args(["client", "play", "--image", "x.png", "--actions", "0,1", "--out", "o"])
    assert play.handler.__name__ == "_client_play"


def test_idle_world_is_evicted_by_the_reaper(world_checkpoint):
    from services.backends.inprocess import InProcessBackend
    from services.gateway.gateway import Gateway, SamplingRequest
    from services.metrics import GatewayMetrics

    settings = GatewaySettings(models={"m": str(world_checkpoint)}, idle_timeout_s=0.2, max_worlds=2)
    gateway = Gateway(settings, InProcessBackend(settings), GatewayMetrics(), MemoryWorldStore())
    try:
        world, _ = gateway.create_world("me", "m", picture(8, 8), SamplingRequest())
        deadline = time.monotonic() + 5
        while gateway.list_worlds("me") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.list_worlds("me") == [] and len(gateway.worlds) == 0
        with pytest.raises(NotFound):
            gateway.step_world("me", world.world_id, 0)
    finally:
        gateway.close()
