"""Serving benchmark: step latency p50/p99 and aggregate frames/s for 1, 8, 32 concurrent sessions
against a real gateway process over gRPC (`--backend inprocess|triton`). Prints a table, writes JSON.

    python bench/bench_serving.py --backends inprocess,triton --preset tiny   # both, and their ratios

Each row also breaks a step down by hop inside the gateway (mean ms, from its genie_step_phase_seconds
metric: submit, queue = batch wait, backend, commit = world store, encode) and the rest ("grpc": the
client's latency minus the gateway's hops: transport and message (de)serialization). The engine's own
step time for an equal world (genie_models.World.step, in this process, alternating in blocks of steps
with the gateway's so both see the same load) is the baseline of the 1-session ratio. The triton backend starts the three model services (services.triton.stack).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from genie.v1 import world_pb2 as pb
from genie_models.allocator import keep_freed_memory
from services.client import connect
from services.triton.stack import ServiceOptions, ServiceStack, free_port

MODEL_NAME = "bench"
BACKENDS = ("inprocess", "triton")


def checkpoint_for(preset: str, out: Path) -> Path:
    """A random-init world of the preset (serving speed does not depend on the weights)."""
    from genie_models.world_model import WorldModel

    directory = out / f"world-{preset}"
    WorldModel.from_preset(preset).save(directory, step=0)
    return directory


@contextlib.contextmanager
def backend_settings(backend: str, checkpoint: Path, max_worlds: int,
                     max_queue_delay_us: int, device: str) -> Iterator[dict[str, str]]:
    """GENIE_GATEWAY_* variables that point the gateway at the backend; the triton backend starts its
    model services here, each with its log and workspace in a temporary directory."""
    if backend == "inprocess":
        yield {"GENIE_GATEWAY_BACKEND": "inprocess", "GENIE_GATEWAY_DEVICE": device,
               "GENIE_GATEWAY_MODELS": json.dumps({MODEL_NAME: str(checkpoint)})}
        return
    # A short workspace root: PyTriton puts Unix sockets in it.
    with tempfile.TemporaryDirectory(prefix="genie-bench-") as logs, \
            tempfile.TemporaryDirectory(prefix="gb-") as workspace_root:
        options = ServiceOptions(max_worlds=max_worlds, max_queue_delay_us=max_queue_delay_us, device=device,
                                 workspace_root=Path(workspace_root))
        with ServiceStack(checkpoint, MODEL_NAME, options, log_dir=Path(logs)) as stack:
            yield stack.gateway_environment()


PHASES = ("submit", "queue", "backend", "commit", "encode")


def engine_world(checkpoint: Path, device: str):
    """One genie_models.World on the checkpoint, reset: the engine alone, no serving around it."""
    from genie_models import World
    from genie_models.world_model import WorldModel

    model = WorldModel.load(checkpoint, device=device)
    world = World(model, seed=0, device=device)
    world.reset(np.zeros((64, 64, 3), np.uint8))
    return world, model.num_actions


def paired_one_session(address: str, checkpoint: Path, steps: int, device: str,
                       block: int = 5) -> dict[str, float]:
    """Alternates blocks of `block` engine steps (this process) and `block` gateway steps of an equal world,
    so both see the same machine load over the run (a 2-core machine shared with other work drifts), while
    each step runs as it would in production: with the other process idle. Alternating single steps instead
    measured OpenMP's spin-waiting: each process's threads still spun, holding both cores, when the other's
    step began (1.6-1.8x on 2 cores; 1.04-1.06x with OMP_WAIT_POLICY=PASSIVE)."""
    import torch

    world, num_actions = engine_world(checkpoint, device)
    channel, stub = connect(address)
    prompt = pb.PromptImage(raw=pb.RawImage(rgb=bytes(64 * 64 * 3), width=64, height=64))
    world_id = stub.CreateWorld(pb.CreateWorldRequest(model=MODEL_NAME, prompt=prompt)).world.world_id
    engine, served = [], []

    def timed(step, index: int) -> float:
        started = time.perf_counter()
        step(index % num_actions)
        return time.perf_counter() - started

    with torch.no_grad():
        for first in range(0, steps + block, block):  # the first block of each is a warm-up
            engine.append([timed(world.step, index) for index in range(first, first + block)])
            served.append([timed(lambda action: stub.StepWorld(pb.StepWorldRequest(world_id=world_id,
                                                                                   action=action)), index)
                           for index in range(first, first + block)])
    stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))
    channel.close()
    engine_ms, served_ms = (np.median(np.concatenate(times[1:])) * 1000 for times in (engine, served))
    block_ratios = [np.median(s) / np.median(e) for e, s in zip(engine[1:], served[1:])]
    return {"engine_p50_ms": float(engine_ms), "gateway_p50_ms": float(served_ms), "block_steps": block,
            "ratio_of_medians": float(served_ms / engine_ms), "median_block_ratio": float(np.median(block_ratios))}


def phase_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """phase -> (sum seconds, count) of the gateway's genie_step_phase_seconds histogram."""
    text = urllib.request.urlopen(metrics_url).read().decode()
    totals = {phase: [0.0, 0.0] for phase in PHASES}
    for line in text.splitlines():
        for phase in PHASES:
            if line.startswith(f'genie_step_phase_seconds_sum{{phase="{phase}"}}'):
                totals[phase][0] = float(line.rsplit(" ", 1)[1])
            elif line.startswith(f'genie_step_phase_seconds_count{{phase="{phase}"}}'):
                totals[phase][1] = float(line.rsplit(" ", 1)[1])
    return {phase: (total, count) for phase, (total, count) in totals.items()}


@contextlib.contextmanager
def running_gateway(env_overrides: dict[str, str], max_worlds: int) -> Iterator[tuple[str, str]]:
    port, metrics_port = free_port(), free_port()
    # Auth off: a benchmark on loopback (API-key checks cost one SHA-256 per call).
    env = os.environ | env_overrides | {"GENIE_GATEWAY_HOST": "127.0.0.1", "GENIE_GATEWAY_PORT": str(port),
                                        "GENIE_GATEWAY_METRICS_PORT": str(metrics_port),
                                        "GENIE_GATEWAY_MAX_WORLDS": str(max_worlds), "GENIE_GATEWAY_AUTH": "none",
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
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        process.terminate()
        process.wait(timeout=60)


def measure(address: str, metrics_url: str, sessions: int, steps: int, num_actions: int) -> dict[str, float]:
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
    before = phase_totals(metrics_url)
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    after = phase_totals(metrics_url)
    for world_id in worlds:
        stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))
    channel.close()
    hops = {f"{phase}_ms": 1000 * (after[phase][0] - before[phase][0]) / max(1.0, after[phase][1] - before[phase][1])
            for phase in PHASES}
    hops["grpc_ms"] = float(np.mean(latencies) * 1000) - sum(hops.values())
    return {"sessions": sessions, "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000), "mean_ms": float(np.mean(latencies) * 1000),
            "frames_per_s": sessions * steps / elapsed, **hops}


def run_backend(backend: str, checkpoint: Path, levels: list[int], steps: int, max_queue_delay_us: int,
                device: str) -> tuple[list[dict[str, float]], dict[str, float]]:
    with backend_settings(backend, checkpoint, max(levels), max_queue_delay_us, device) as env, \
            running_gateway(env, max(levels)) as (address, metrics_url):
        channel, stub = connect(address)
        with channel:
            num_actions = stub.ListModels(pb.ListModelsRequest()).models[0].num_actions
        measure(address, metrics_url, 1, 3, num_actions)  # warm-up
        rows = [measure(address, metrics_url, n, steps, num_actions) for n in levels]
        return rows, paired_one_session(address, checkpoint, steps, device)


def print_rows(backend: str, rows: list[dict[str, float]], paired: dict[str, float]) -> None:
    print(f"{backend}:")
    hops = [*PHASES, "grpc"]
    print(f"{'sessions':>8} {'p50 ms':>8} {'p99 ms':>8} {'frames/s':>9}  mean ms per hop: " + " ".join(f"{h:>7}" for h in hops))
    for row in rows:
        print(f"{row['sessions']:>8} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['frames_per_s']:>9.1f}  "
              f"{'':>16}" + " ".join(f"{row[f'{h}_ms']:>7.2f}" for h in hops))
    print(f"1 session, in blocks of {paired['block_steps']} steps alternating with the engine's own step "
          f"(genie_models.World.step): engine p50 {paired['engine_p50_ms']:.1f} ms, gateway p50 "
          f"{paired['gateway_p50_ms']:.1f} ms, {paired['ratio_of_medians']:.2f}x "
          f"(median of per-block ratios {paired['median_block_ratio']:.2f}x)")
    print(f"throughput {rows[-1]['sessions']} vs {rows[0]['sessions']} sessions: "
          f"{rows[-1]['frames_per_s'] / rows[0]['frames_per_s']:.2f}x")


def print_ratios(results: dict[str, list[dict[str, float]]], numerator: str, denominator: str) -> None:
    print(f"{numerator}/{denominator}:")
    print(f"{'sessions':>8} {'p50':>8} {'frames/s':>9}")
    for top, bottom in zip(results[numerator], results[denominator]):
        print(f"{top['sessions']:>8} {top['p50_ms'] / bottom['p50_ms']:>8.2f} "
              f"{top['frames_per_s'] / bottom['frames_per_s']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inprocess", choices=BACKENDS)
    parser.add_argument("--backends", help="comma-separated backends to run one after another (overrides "
                        "--backend); with two, also prints the second/first ratios")
    parser.add_argument("--preset", default="tiny", help="random-init preset when no --checkpoint is given")
    parser.add_argument("--checkpoint", type=Path, help="a saved world directory")
    parser.add_argument("--sessions", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20, help="steps per session")
    parser.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda)")
    parser.add_argument("--max-queue-delay-us", type=int, default=500, help="the Triton services' batching delay")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"),
                        help="writes serving-PRESET-BACKEND.json here")
    args = parser.parse_args()
    keep_freed_memory()  # the engine baseline stepped here must run as the gateway it is compared with does
    backends = args.backends.split(",") if args.backends else [args.backend]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    levels = [int(n) for n in args.sessions.split(",")]
    results, paired = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or checkpoint_for(args.preset, Path(scratch))
        for backend in backends:
            results[backend], paired[backend] = run_backend(backend, checkpoint, levels, args.steps, args.max_queue_delay_us,
                                           args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = args.checkpoint.name if args.checkpoint else args.preset
    for backend, rows in results.items():
        print_rows(backend, rows, paired[backend])
        settings = {"steps": args.steps, "max_queue_delay_us": args.max_queue_delay_us, "cpus": os.cpu_count(),
                    "device": args.device}
        (args.out_dir / f"serving-{name}-{backend}.json").write_text(json.dumps(
            {"backend": backend, "preset": args.preset, "checkpoint": str(args.checkpoint or ""),
             "settings": settings, "one_session_vs_engine": paired[backend], "rows": rows}, indent=2))
    if len(backends) == 2:
        print_ratios(results, backends[1], backends[0])


if __name__ == "__main__":
    main()
