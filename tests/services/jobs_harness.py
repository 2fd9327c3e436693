"""Processes of the job tests: the job service (`genie serve jobs`) and workers (`genie worker`), started
exactly as in production, niced, each in its own session so a test can SIGKILL a whole worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genie.v1 import jobs_pb2 as pb
from genie.v1 import jobs_pb2_grpc
from services.jobs.records import JobRecords
from tests.services.helpers import free_port
from tests.services.jobs_servers import RedisServer, S3Server

GENIE = str(Path(sys.executable).parent / "genie")
# Tiny jobs: a few steps per stage, checkpoints often, so the fault tests have something to resume from.
# The key of the test stack's one caller (read and train scopes); each stub and CLI call sends it.
API_KEY = "jobs-test-key-" + os.urandom(8).hex()
TINY = {"tokenizer_steps": "3", "lam_steps": "2", "dynamics_steps": "3", "batch_size": "2", "checkpoint_every": "2",
        "eval_clips": "2", "eval_horizon": "4"}


def write_videos(folder: Path, count: int = 3, frames: int = 12, size: int = 64) -> Path:
    """count short H.264 mp4s of a square moving across a gradient."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        with av.open(str(folder / f"clip{index}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.height = stream.width = size
            stream.pix_fmt = "yuv420p"
            for t in range(frames):
                frame = np.full((size, size, 3), 40 + 10 * index, dtype=np.uint8)
                left = (4 * t + 8 * index) % (size - 12)
                frame[20:32, left:left + 12] = (230, 30, 30)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return folder


@dataclass
class Proc:
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker and its stage process)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    handle = log.open("ab")
    process = subprocess.Popen(["nice", "-n", "19", GENIE, *args], env={**os.environ, **env}, stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(process, log)


@dataclass
class JobsStack:
    redis: RedisServer
    s3: S3Server
    bucket: str
    port: int
    metrics_port: int
    queue: str
    tmp: Path
    service: Proc | None = None

    @property
    def records(self) -> JobRecords:
        return JobRecords.from_url(self.redis.url)

    def store_env(self, **overrides: str) -> dict[str, str]:
        return self.s3.env(bucket=self.bucket, GENIE_STORE_RETRY_S="20") | overrides

    def start_service(self) -> None:
        keys = self.tmp / "job-api-keys"
        keys.write_text(f"tests {API_KEY} read,train\n")
        env = self.store_env() | {"GENIE_JOBS_REDIS_URL": self.redis.url, "GENIE_JOBS_QUEUE": self.queue,
                                  "GENIE_JOBS_WATCH_POLL_S": "0.1", "GENIE_JOBS_API_KEYS_FILE": str(keys)}
        self.service = spawn(["serve", "jobs", "--port", str(self.port), "--metrics-port", str(self.metrics_port)],
                             env, self.tmp / "jobs-service.log")
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 240  # a starved CI core imports grpc + celery slowly
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        self.service.kill()
        raise RuntimeError("job service not healthy:\n" + self.service.tail())

    def start_worker(self, name: str, **env_overrides: str) -> Proc:
        env = self.store_env() | {
            "GENIE_WORKER_REDIS_URL": self.redis.url, "GENIE_WORKER_QUEUE": self.queue,
            "GENIE_WORKER_SCRATCH_DIR": str(self.tmp / f"scratch-{name}"), "GENIE_WORKER_VISIBILITY_TIMEOUT_S": "6",
            "GENIE_WORKER_LEASE_S": "3", "GENIE_WORKER_POLL_S": "0.2", "GENIE_WORKER_METRICS_PORT": str(free_port()),
            "GENIE_WORKER_DEVICE": "cpu", "OMP_NUM_THREADS": "1"} | env_overrides
        proc = spawn(["worker"], env, self.tmp / f"worker-{name}.log")
        proc.metrics_port = int(env["GENIE_WORKER_METRICS_PORT"])
        return proc

    def stub(self) -> jobs_pb2_grpc.JobServiceStub:
        from services.client import open_channel

        return jobs_pb2_grpc.JobServiceStub(open_channel(f"127.0.0.1:{self.port}", API_KEY))

    def submit(self, model_name: str, dataset: str = "squares", **overrides: str) -> pb.Job:
        return self.stub().SubmitJob(pb.SubmitJobRequest(dataset=dataset, preset="tiny", model_name=model_name,
                                                         overrides=TINY | overrides))

    def wait(self, job_id: str, until, timeout_s: float = 120.0, workers: tuple[Proc, ...] = ()):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.records.get(job_id)
            if until(record):
                return record
            time.sleep(0.1)
        logs = "\n".join(worker.tail() for worker in workers)
        raise AssertionError(f"timed out waiting on {job_id}: {self.records.get(job_id)}\n{logs}")


@pytest.fixture(scope="module")
def jobs_stack(redis_server, s3_server, tmp_path_factory) -> Iterator[JobsStack]:
    from services.settings import StoreSettings
    from services.stores.base import open_store
    from services.stores.datasets import upload_videos

    tmp = tmp_path_factory.mktemp("jobs")
    stack = JobsStack(redis_server, s3_server, "jobs-" + os.urandom(3).hex(), free_port(), free_port(),
                      "q-" + os.urandom(3).hex(), tmp)
    store = open_store(StoreSettings(**{k.removeprefix("GENIE_STORE_").lower(): v for k, v in stack.store_env().items()}))
    upload_videos(store, write_videos(tmp / "videos"), "squares")
    stack.start_service()
    yield stack
    stack.service.kill()
