"""Training-as-jobs benchmark, against a private Redis, a SeaweedFS S3 server and a real `genie worker`:

1. overhead of the tokenizer stage run as a Celery job (inputs from S3, checkpoints synced to S3) versus the
   same stage run directly (`genie train tokenizer` on the same data, same steps), as wall-time ratio;
2. time to publish and to load (download + sha256 verify) a `tiny` and a `coinrun`-sized world;
3. published -> first new world served on it (issue 8), on a real gateway of each backend (`inprocess`; `triton`
   with the three real Triton model services, --catalog): from the publish call's return (`latest` moved) to a
   world created on the new version that has answered its first step, split into the catalog poll's wait,
   download + sha256, model load, and the first world (read from the gateway's and services' log lines).

    python bench/bench_jobs.py --steps 200 --presets tiny,coinrun --out bench/results/jobs-cpu.json
    python bench/bench_jobs.py --skip-overhead --presets tiny --repeats 3    # parts 2 and 3 only
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genie.v1 import jobs_pb2 as pb  # noqa: E402
from genie.v1 import world_pb2, world_pb2_grpc  # noqa: E402
from services.settings import StoreSettings  # noqa: E402
from services.stores.base import open_store  # noqa: E402
from services.stores.catalog import ModelCatalog  # noqa: E402
from services.stores.datasets import upload_videos  # noqa: E402
# The tests' real-server harness: SeaweedFS, Redis, job service and worker, gateway and Triton services.
from tests.services.catalog_harness import create_world, gateway_process, open_catalog, store_settings  # noqa: E402
from tests.services.helpers import open_channel  # noqa: E402
from tests.services.jobs_harness import JobsStack, write_videos  # noqa: E402
from tests.services.jobs_servers import RedisServer, S3Server, free_ports, redis_server_binary  # noqa: E402
from tests.services.triton_stack import running_stack  # noqa: E402

GENIE = str(Path(sys.executable).parent / "genie")
# Both runs train with the same clips per step and checkpoint as often (the tiny tokenizer preset's own batch is
# 16; an earlier version of this script gave the job 8 and the direct run 16, and measured the job 0.55x).
BATCH_SIZE = 8
BACKENDS = ("inprocess", "triton")
# How often the client asks ListModels for the latest version while waiting for the new one: at most this much of
# a run is the client's own lag, not the gateway's.
CLIENT_RETRY_S = 0.1


def start_redis() -> RedisServer:
    port = free_ports(1)[0]
    return RedisServer(port, subprocess.Popen([redis_server_binary(), "--port", str(port), "--save", "",
                                               "--appendonly", "no"], stdout=subprocess.DEVNULL))


def start_s3(tmp: Path) -> S3Server:
    s3 = S3Server(tmp / "s3", free_ports(12), "bench", os.urandom(12).hex())
    (tmp / "s3").mkdir()
    s3.start()
    return s3


def stage_overhead(stack: JobsStack, steps: int, checkpoint_every: int) -> dict[str, float]:
    """Wall time of the tokenizer stage: as a job (task received -> stage done) vs `genie train tokenizer`."""
    worker = stack.start_worker("bench")
    try:
        job = stack.submit("bench", tokenizer_steps=str(steps), checkpoint_every=str(checkpoint_every),
                           batch_size=str(BATCH_SIZE), dynamics_steps="1", eval_clips="1")
        stack.wait(job.job_id, lambda r: r.stage == "tokenizer" and r.state == "running", timeout_s=900)
        started = time.perf_counter()
        stack.wait(job.job_id, lambda r: r.stage != "tokenizer" or r.finished, timeout_s=24 * 3600)
        as_job = time.perf_counter() - started
        stack.stub().CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    finally:
        worker.kill()
    data = next((stack.tmp / "scratch-bench").glob("job-*/data"))
    started = time.perf_counter()
    subprocess.run(["nice", "-n", "19", GENIE, "train", "tokenizer", "--data", str(data), "--run",
                    str(stack.tmp / "direct-run"), "--preset", "tiny", "--steps", str(steps), "--device", "cpu",
                    "--batch-size", str(BATCH_SIZE), "--checkpoint-every", str(checkpoint_every)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    direct = time.perf_counter() - started
    return {"steps": steps, "as_job_s": as_job, "direct_s": direct, "overhead_ratio": as_job / direct}


def publish_and_load(store, preset: str, tmp: Path) -> dict[str, float]:
    from genie_models.world_model import WorldModel

    directory = tmp / f"world-{preset}"
    WorldModel.from_preset(preset).save(directory, step=0)
    size = sum(path.stat().st_size for path in directory.iterdir())
    catalog = ModelCatalog(store)
    started = time.perf_counter()
    model = catalog.publish(f"bench-{preset}", directory)
    publish_s = time.perf_counter() - started
    started = time.perf_counter()
    catalog.load(model.ref, tmp / f"cache-{preset}")
    load_s = time.perf_counter() - started
    return {"bytes": size, "publish_s": publish_s, "load_s": load_s}


def overhead_with_a_worker(s3: S3Server, tmp: Path, steps: int, checkpoint_every: int) -> dict[str, float]:
    """Part 1, with its own Redis, job service and worker."""
    redis = start_redis()
    try:
        stack = JobsStack(redis, s3, "bench", free_ports(1)[0], free_ports(1)[0], "bench-q", tmp)
        env = {k.removeprefix("GENIE_STORE_").lower(): v for k, v in stack.store_env().items()}
        upload_videos(open_store(StoreSettings(**env)), write_videos(tmp / "videos", count=4, frames=48), "squares")
        stack.start_service()
        try:
            return stage_overhead(stack, steps, checkpoint_every)
        finally:
            stack.service.kill()
    finally:
        redis.process.terminate()


# --- Part 3: published -> first new world served -----------------------------------------------------------------

def world_versions(preset: str, count: int, tmp: Path) -> list[Path]:
    """count checkpoints of the preset, each from its own seed: other weights, so each version is a new download."""
    import torch
    from genie_models.world_model import WorldModel

    directories = []
    for version in range(1, count + 1):
        torch.manual_seed(version)
        directories.append(tmp / f"world-{preset}-v{version}")
        WorldModel.from_preset(preset).save(directories[-1], step=version)
    return directories


@contextlib.contextmanager
def catalog_gateway(backend: str, name: str, environment: dict[str, str], tmp: Path,
                    poll_s: float) -> Iterator[tuple[int, dict[str, Path]]]:
    """`genie serve gateway` serving name from the catalog, as deployed; yields its port and the logs that tell the
    timeline of a new version (the gateway's; with triton also the three services', which download and load)."""
    log = tmp / f"gateway-{name}.log"
    settings = environment | {"GENIE_GATEWAY_CATALOG_POLL_S": str(poll_s)}
    if backend == "inprocess":
        settings |= {"GENIE_GATEWAY_BACKEND": "inprocess", "GENIE_GATEWAY_CATALOG_MODELS": json.dumps([name])}
        with gateway_process(settings, log) as (port, _):
            yield port, {"gateway": log}
        return
    with running_stack(None, name, environment=environment) as stack, \
            gateway_process(stack.gateway_environment() | settings, log, torch_free=True) as (port, _):
        yield port, {"gateway": log} | {kind: service.log_path for kind, service in stack.services.items()}


# Searched for, not matched at the line's start: tritonserver writes to the same file, so a line of ours may follow
# a part line of its own (the likely reason one run's timeline lacked a service's "fetched" line).
TEXT_LINE = re.compile(r"(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>\S+) \S+: (?P<message>.*)$")


def log_events(path: Path, offset: int, source: str) -> list[tuple[float, dict]]:
    """(time, entry) of each log line written after offset: the gateway's JSON lines (UTC) and the Triton services'
    text lines ("2026-11-28 16:45:01,123 INFO genie.triton: message", local time); each entry names its source."""
    with path.open("rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):
            if line.startswith("{"):
                entry = json.loads(line)
                moment = datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
                events.append((moment.timestamp(), entry | {"source": source}))
            elif match := TEXT_LINE.search(line):
                moment = datetime.strptime(match["ts"], "%Y-%m-%d %H:%M:%S,%f")
                events.append((moment.timestamp(), {"message": match["message"], "level": match["level"],
                                                     "source": source}))
    return events


def phases(events: list[tuple[float, dict]], ref: str, published: float, client: dict[str, float]) -> dict:
    """Splits publish -> served (published: when the publish call returned) at the log lines of the version's way:
    noticed by the poll, fetched (download + sha256; with triton, by each service), loaded, given to new worlds."""
    def first(message: str) -> float:
        return min(when for when, entry in events if entry["message"] == message and entry.get("model") == ref)

    def matching(pattern: str) -> list[tuple[float, str, re.Match]]:
        return [(when, entry["source"], match) for when, entry in sorted(events, key=lambda event: event[0])
                if (match := re.fullmatch(pattern, entry["message"]))]

    fetches = matching(rf"fetched {re.escape(ref)} \((download|cached) \+ sha256\) in ([\d.]+) s")
    version = ref.rpartition("@")[2]
    bound = {match[1]: when - published for when, _, match in matching(rf"(\w+) service loaded version {version}")}
    noticed, loaded = first("a new version is published; loading it"), first("model version loaded")
    # A source's first fetch ends its fetch phase; a later one is a retried load (reported, not timed as fetch).
    first_fetch = {source: when for when, source, _ in reversed(fetches)}
    switched, fetched = first("new worlds get the new version"), max(first_fetch.values())
    problems = [f"{entry['source']}: {entry['message']}"[:300] for _, entry in events
                if entry.get("level") in ("WARNING", "ERROR", "CRITICAL")]
    # The first five phases add up to total_s; client_lag_s, create_world_s and first_step_s to first_world_s.
    times = {"total_s": client["served"] - published, "poll_wait_s": noticed - published,
             "fetch_s": fetched - noticed, "model_load_s": loaded - fetched, "switch_s": switched - loaded,
             "first_world_s": client["served"] - switched, "client_lag_s": client["create_started"] - switched,
             "create_world_s": client["created"] - client["create_started"],
             "first_step_s": client["served"] - client["created"]}
    return {key: round(value, 3) for key, value in times.items()} | {
        "fetches": [f"{source}: {match[1]} + sha256 {match[2]} s" for _, source, match in fetches],
        "services_loaded_at_s": {kind: round(at, 3) for kind, at in sorted(bound.items())},
        "list_models_polls": client["polls"], "warnings": problems[:10]}


def first_world_on(stub, name: str, version: int, timeout_s: float = 900) -> tuple[str, dict[str, float]]:
    """Once ListModels names version the latest, creates a world of name and steps it; returns its id and the
    client's times (epoch seconds). ListModels, not CreateWorld, is polled: a prompt's encode in every poll would
    compete with the load being measured (in-process: in the same gateway process)."""
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count(1):
        if latest_version(stub, name) == version:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: version {version} not the latest within {timeout_s} s")
        time.sleep(CLIENT_RETRY_S)
    started = time.time()
    world = create_world(stub, seed=attempt, model=name).world
    created = time.time()
    assert world.model_version == version, f"a new world plays version {world.model_version}, not {version}"
    stub.StepWorld(world_pb2.StepWorldRequest(world_id=world.world_id, action=0), timeout=60)
    return world.world_id, {"create_started": started, "created": created, "served": time.time(), "polls": attempt}


def listed(stub, name: str) -> world_pb2.Model | None:
    return next((model for model in stub.ListModels(world_pb2.ListModelsRequest()).models if model.name == name), None)


def latest_version(stub, name: str) -> int:
    model = listed(stub, name)
    return model.latest_version if model else 0


def wait_loaded(stub, name: str, versions: list[int], timeout_s: float = 600) -> None:
    """Until the gateway lists exactly versions as loaded (a run starts with nothing else loading or unloading)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        model = listed(stub, name)
        if model is not None and list(model.loaded_versions) == versions:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name}: versions {versions} not (only) loaded within {timeout_s} s")


def publish_to_served(catalog: ModelCatalog, stub, name: str, checkpoint: Path, logs: dict[str, Path]) -> dict:
    """One run: a world plays the latest version; the next is published and new worlds are created until one plays
    it and has stepped. The old world steps once more after (it keeps its version), then both close."""
    playing = create_world(stub, seed=0, model=name).world
    stub.StepWorld(world_pb2.StepWorldRequest(world_id=playing.world_id, action=1), timeout=60)
    offsets = {source: log.stat().st_size for source, log in logs.items()}
    load_average = os.getloadavg()[0]  # the machine is shared: how busy it was as the run started
    model = catalog.publish(name, checkpoint)
    published = time.time()  # `latest` names the new version from here on
    world_id, client = first_world_on(stub, name, model.version)
    stub.StepWorld(world_pb2.StepWorldRequest(world_id=playing.world_id, action=2), timeout=60)
    old_version = stub.GetWorld(world_pb2.GetWorldRequest(world_id=playing.world_id)).model_version
    assert old_version == playing.model_version, f"the open world moved from its version to {old_version}"
    for world in (playing.world_id, world_id):
        stub.CloseWorld(world_pb2.CloseWorldRequest(world_id=world))
    events = [event for source, log in logs.items() for event in log_events(log, offsets[source], source)]
    timeline = phases(events, model.ref, published, client)
    return {"version": model.version, "load_average_1m": round(load_average, 2)} | timeline


def served_runs(backend: str, preset: str, checkpoints: list[Path], s3: S3Server, tmp: Path, poll_s: float) -> dict:
    """len(checkpoints) - 1 runs on one gateway: version 1 is served first, each run publishes the next."""
    name = f"served-{preset}-{backend}"
    environment = store_settings(s3, "bench", tmp / f"model-cache-{backend}")
    catalog = open_catalog(environment)
    catalog.publish(name, checkpoints[0])
    runs = []
    with catalog_gateway(backend, name, environment, tmp, poll_s) as (port, logs), \
            contextlib.closing(open_channel(port)) as channel:
        stub = world_pb2_grpc.WorldServiceStub(channel)
        wait_loaded(stub, name, [1])
        for checkpoint in checkpoints[1:]:
            runs.append(publish_to_served(catalog, stub, name, checkpoint, logs))
            print(backend, preset, json.dumps(runs[-1]), flush=True)
            wait_loaded(stub, name, [runs[-1]["version"]])  # the old version's unload is over before the next run
    return {"catalog_poll_s": poll_s, "runs": runs}


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def run_parts(args: argparse.Namespace, s3: S3Server, tmp: Path, results: dict) -> None:
    """Each part's results replace that part's in results (the others are kept) and are saved when it ends."""
    presets = list(filter(None, args.presets.split(",")))
    catalog = open_catalog(store_settings(s3, "bench", tmp / "model-cache"))
    for preset in presets:
        results.setdefault("models", {})[preset] = publish_and_load(catalog.store, preset, tmp)
        print(preset, results["models"][preset], flush=True)
    if not args.skip_overhead:
        results["stage_overhead"] = overhead_with_a_worker(s3, tmp, args.steps, args.checkpoint_every)
        save(results, args.out)
    for preset in presets:
        checkpoints = world_versions(preset, args.repeats + 1, tmp)
        for backend in filter(None, args.backends.split(",")):
            served = served_runs(backend, preset, checkpoints, s3, tmp, args.poll_s)
            results.setdefault("publish_to_served", {}).setdefault(preset, {})[backend] = served
            save(results, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="tokenizer steps of the overhead run")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--skip-overhead", action="store_true", help="skip part 1 (its earlier result is kept)")
    parser.add_argument("--presets", default="tiny,coinrun",
                        help='worlds of parts 2 and 3 ("": none); a coinrun-sized part 3 takes hours on CPU')
    parser.add_argument("--backends", default=",".join(BACKENDS), help="gateway backends of part 3")
    parser.add_argument("--repeats", type=int, default=3, help="publish -> served runs per preset and backend")
    parser.add_argument("--poll-s", type=float, default=2.0,
                        help="the gateways' GENIE_GATEWAY_CATALOG_POLL_S (2: its default)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/jobs-cpu.json"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphan servers
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        s3 = start_s3(tmp)
        try:
            # Results of an earlier run are kept for the parts this run skips.
            results = json.loads(args.out.read_text()) if args.out.is_file() else {}
            run_parts(args, s3, tmp, results)
            print(json.dumps(results, indent=1))
            save(results, args.out)
        finally:
            s3.stop(kill=True)


if __name__ == "__main__":
    main()
