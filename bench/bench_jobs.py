"""Training-as-jobs benchmark, against a private Redis, a SeaweedFS S3 server and a real `genie worker`:

1. overhead of the tokenizer stage run as a Celery job (inputs from S3, checkpoints synced to S3) versus the
   same stage run directly (`genie train tokenizer` on the same data, same steps), as wall-time ratio;
2. time to publish and to load (download + sha256 verify) a `tiny` and a `coinrun`-sized world.

    python bench/bench_jobs.py --steps 200 --presets tiny,coinrun --out bench/results/jobs-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genie.v1 import jobs_pb2 as pb  # noqa: E402
from services.settings import StoreSettings  # noqa: E402
from services.stores.base import open_store  # noqa: E402
from services.stores.catalog import ModelCatalog  # noqa: E402
from services.stores.datasets import upload_videos  # noqa: E402
from tests.services.jobs_harness import JobsStack, write_videos  # noqa: E402 - the tests' real-server harness
from tests.services.jobs_servers import RedisServer, S3Server, free_ports, redis_server_binary  # noqa: E402

GENIE = str(Path(sys.executable).parent / "genie")
# Both runs train with the same clips per step and checkpoint as often (the tiny tokenizer preset's own batch is
# 16; an earlier version of this script gave the job 8 and the direct run 16, and measured the job 0.55x).
BATCH_SIZE = 8


def start_servers(tmp: Path) -> tuple[RedisServer, S3Server]:
    port = free_ports(1)[0]
    redis = RedisServer(port, subprocess.Popen([redis_server_binary(), "--port", str(port), "--save", "",
                                                "--appendonly", "no"], stdout=subprocess.DEVNULL))
    s3 = S3Server(tmp / "s3", free_ports(12), "bench", os.urandom(12).hex())
    (tmp / "s3").mkdir()
    s3.start()
    return redis, s3


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="tokenizer steps of the overhead run")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--presets", default="tiny,coinrun", help='worlds to publish and load ("": none)')
    parser.add_argument("--out", type=Path, default=Path("bench/results/jobs-cpu.json"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphan servers
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        redis, s3 = start_servers(tmp)
        try:
            stack = JobsStack(redis, s3, "bench", free_ports(1)[0], free_ports(1)[0], "bench-q", tmp)
            env = {k.removeprefix("GENIE_STORE_").lower(): v for k, v in stack.store_env().items()}
            store = open_store(StoreSettings(**env))
            # Results of an earlier run are kept for the parts this run skips (--presets "").
            results = json.loads(args.out.read_text()) if args.out.is_file() else {}
            results.setdefault("models", {})
            for preset in filter(None, args.presets.split(",")):
                results["models"][preset] = publish_and_load(store, preset, tmp)
                print(preset, results["models"][preset], flush=True)
            upload_videos(store, write_videos(tmp / "videos", count=4, frames=48), "squares")
            stack.start_service()
            try:
                results["stage_overhead"] = stage_overhead(stack, args.steps, args.checkpoint_every)
            finally:
                stack.service.kill()
            print(json.dumps(results, indent=1))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        finally:
            s3.stop(kill=True)
            redis.process.terminate()


if __name__ == "__main__":
    main()
