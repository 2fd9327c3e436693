"""Serving benchmark: step latency p50/p99 and aggregate frames/s for 1, 8, 32 concurrent sessions
against a real gateway process over gRPC (`--backend inprocess|triton`). Prints a table, writes JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from genie.v1 import world_pb2 as pb
from services.client import connect

MODEL_NAME = "bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def checkpoint_for(preset: str, out: Path) -> Path:
    """A random-init world of the preset (serving speed does not depend on the weights)."""
    from genie_models.world_model import WorldModel

    directory = out / f"world-{preset}"
    WorldModel.from_preset(preset).save(directory, step=0)
    return directory


@contextlib.contextmanager
def backend_settings(backend: str, checkpoint: Path) -> Iterator[dict[str, str]]:
    """GENIE_GATEWAY_* variables that point the gateway at the backend; the triton backend starts its
    model services here (wire it to tests/services/triton_stack.triton_stack)."""
    if backend == "inprocess":
        yield {"GENIE_GATEWAY_BACKEND": "inprocess", "GENIE_GATEWAY_MODELS": json.dumps({MODEL_NAME: str(checkpoint)})}
        return
    raise SystemExit(f"backend {backend!r} is not wired into this benchmark yet")


@contextlib.contextmanager
def running_gateway(env_overrides: dict[str, str], max_worlds: int) -> Iterator[str]:
    port = free_port()
    env = os.environ | env_overrides | {"GENIE_GATEWAY_HOST": "127.0.0.1", "GENIE_GATEWAY_PORT": str(port),
                                        "GENIE_GATEWAY_METRICS_PORT": "0", "GENIE_GATEWAY_MAX_WORLDS": str(max_worlds),
                                        "GENIE_GATEWAY_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env)
    try:
        channel, stub = connect(f"127.0.0.1:{port}")
        with channel:
            deadline = time.monotonic() + 120
            while True:
                try:
                    stub.ListModels(pb.ListModelsRequest(), timeout=2)
                    break
                except Exception:  # noqa: BLE001 - not up yet; the deadline bounds the wait
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def measure(address: str, sessions: int, steps: int, num_actions: int) -> dict[str, float]:
    """Each session creates a world and steps it `steps` times in its own thread."""
    channel, stub = connect(address)
    prompt = pb.PromptImage(raw=pb.RawImage(rgb=bytes(64 * 64 * 3), width=64, height=64))
    worlds = [stub.CreateWorld(pb.CreateWorldRequest(model=MODEL_NAME, prompt=prompt,
                                                     sampling=pb.SamplingParams(seed=s))).world.world_id
              for s in range(sessions)]
    latencies: list[float] = []
    barrier = threading.Barrier(sessions + 1)

    def play(world_id: str) -> None:
        barrier.wait()
        for index in range(steps):
            started = time.perf_counter()
            stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=index % num_actions))
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=play, args=(w,)) for w in worlds]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for world_id in worlds:
        stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))
    channel.close()
    return {"sessions": sessions, "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000), "frames_per_s": sessions * steps / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inprocess", choices=["inprocess", "triton"])
    parser.add_argument("--preset", default="tiny", help="random-init preset when no --checkpoint is given")
    parser.add_argument("--checkpoint", type=Path, help="a saved world directory")
    parser.add_argument("--sessions", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20, help="steps per session")
    parser.add_argument("--out", type=Path, default=Path("out/bench/serving.json"))
    args = parser.parse_args()
    levels = [int(n) for n in args.sessions.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or checkpoint_for(args.preset, Path(scratch))
        with backend_settings(args.backend, checkpoint) as env, running_gateway(env, max(levels)) as address:
            channel, stub = connect(address)
            with channel:
                num_actions = stub.ListModels(pb.ListModelsRequest()).models[0].num_actions
            measure(address, 1, 3, num_actions)  # warm-up
            rows = [measure(address, n, args.steps, num_actions) for n in levels]
    print(f"{'sessions':>8} {'p50 ms':>8} {'p99 ms':>8} {'frames/s':>9}")
    for row in rows:
        print(f"{row['sessions']:>8} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['frames_per_s']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": args.backend, "preset": args.preset, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
