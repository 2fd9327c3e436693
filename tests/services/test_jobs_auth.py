"""The job service knows its callers: API keys with read/train scopes, jobs owned by the key that submitted them,
open health, keys never logged or stored, TLS, and the `genie jobs` CLI sending a key.

A real job service (services/jobs/server.py) on loopback with a private Redis and a local store; no worker
runs, so submitted jobs stay queued.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genie.v1 import jobs_pb2 as pb
from genie.v1 import jobs_pb2_grpc
from services.auth import hash_key
from services.client import open_channel
from services.jobs.records import JobRecord
from services.jobs.server import JobsRuntime, start
from services.settings import JobsSettings, StoreSettings
from services.stores.base import open_store
from services.stores.datasets import upload_videos
from tests.services.helpers import bearer, certificates, failure
from tests.services.jobs_harness import GENIE, write_videos
from tests.services.redis_server import redis_server

pytestmark = pytest.mark.integration

ALICE, BOB = "alice-jobs-key-0123456789", "bob-jobs-key-9876543210"
READER = "reader-jobs-key-5555555555"
PLAYER = "player-jobs-key-2718281828"  # a gateway-only key: read,play, no train


@dataclass
class Deployment:
    redis_url: str
    store: StoreSettings
    keys: Path

    def start(self, **settings: object) -> JobsRuntime:
        return start(JobsSettings(**{"port": 0, "metrics_port": 0, "redis_url": self.redis_url, "queue": "q-auth",
                                     "watch_poll_s": 0.05, "auth": "api-key", "api_keys_file": self.keys}
                                  | settings), self.store)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    """A private Redis, a local store with the dataset "squares", and a key file (bob's stored as a hash)."""
    tmp = tmp_path_factory.mktemp("jobs-auth")
    store = StoreSettings(kind="local", root=str(tmp / "store"))
    upload_videos(open_store(store), write_videos(tmp / "videos", count=1, frames=4), "squares")
    keys = tmp / "job-api-keys"
    keys.write_text(f"# name key [scopes]\nalice {ALICE}\nbob sha256:{hash_key(BOB)} read,train\n"
                    f"reader {READER} read\nplayer {PLAYER} read,play\n")
    with redis_server(tmp) as url:
        yield Deployment(url, store, keys)


@pytest.fixture(scope="module")
def secured(deployment) -> Iterator[tuple[JobsRuntime, grpc.Channel]]:
    runtime = deployment.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    yield runtime, channel
    channel.close()
    runtime.stop(grace_s=0)


def _submit(stub: jobs_pb2_grpc.JobServiceStub, key: str) -> pb.Job:
    return stub.SubmitJob(pb.SubmitJobRequest(dataset="squares", preset="tiny", model_name="squares"),
                          metadata=bearer(key), timeout=60)


def test_calls_without_a_known_key_are_unauthenticated_and_never_echo_the_key(secured):
    stub = jobs_pb2_grpc.JobServiceStub(secured[1])
    for call, request in ((stub.ListJobs, pb.ListJobsRequest()), (stub.GetJob, pb.GetJobRequest(job_id="job-1")),
                          (stub.SubmitJob, pb.SubmitJobRequest(dataset="squares")),
                          (stub.CancelJob, pb.CancelJobRequest(job_id="job-1")),
                          (stub.WatchJob, pb.WatchJobRequest(job_id="job-1"))):
        code, details = failure(call, request)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer KEY" in details
        code, details = failure(call, request, [("x-api-key", "guessed-key-42")])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "guessed-key-42" not in details
    assert stub.ListJobs(pb.ListJobsRequest(), metadata=[("x-api-key", ALICE)], timeout=10) is not None


def test_a_key_without_the_train_scope_may_read_but_not_submit_or_cancel(secured):
    stub = jobs_pb2_grpc.JobServiceStub(secured[1])
    job_id = _submit(stub, ALICE).job_id
    for key, name in ((READER, "reader"), (PLAYER, "player")):
        assert stub.ListJobs(pb.ListJobsRequest(), metadata=bearer(key), timeout=10).jobs == []
        code, details = failure(stub.SubmitJob, pb.SubmitJobRequest(dataset="squares", preset="tiny"), bearer(key))
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"'{name}' may not train" in details
        assert failure(stub.CancelJob, pb.CancelJobRequest(job_id=job_id), bearer(key))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
    assert stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=bearer(ALICE)).state == pb.JOB_STATE_QUEUED


def test_a_job_is_invisible_to_other_keys(secured):
    stub = jobs_pb2_grpc.JobServiceStub(secured[1])
    job_id = _submit(stub, ALICE).job_id
    missing = failure(stub.GetJob, pb.GetJobRequest(job_id="job-000000000000"), bearer(BOB))
    for call, request in ((stub.GetJob, pb.GetJobRequest(job_id=job_id)),
                          (stub.CancelJob, pb.CancelJobRequest(job_id=job_id)),
                          (stub.WatchJob, pb.WatchJobRequest(job_id=job_id))):
        code, details = failure(call, request, bearer(BOB))
        assert code == grpc.StatusCode.NOT_FOUND == missing[0]  # told apart from a missing job by nothing
        assert details == missing[1].replace("job-000000000000", job_id)
    bobs_job = _submit(stub, BOB).job_id
    assert [job.job_id for job in stub.ListJobs(pb.ListJobsRequest(), metadata=bearer(BOB)).jobs] == [bobs_job]
    alices = {job.job_id: job.owner for job in stub.ListJobs(pb.ListJobsRequest(), metadata=bearer(ALICE)).jobs}
    assert alices[job_id] == "alice" and bobs_job not in alices  # a job names the key that submitted it
    first = next(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=bearer(ALICE), timeout=10))
    assert first.job_id == job_id and first.state == pb.JOB_STATE_QUEUED
    cancelled = stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=bearer(ALICE))
    assert cancelled.state == pb.JOB_STATE_CANCELLED  # bob's cancel above changed nothing
    assert [update.state for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=bearer(ALICE),
                                                     timeout=10)] == [pb.JOB_STATE_CANCELLED]


def test_health_needs_no_key(secured):
    health = health_pb2_grpc.HealthStub(secured[1])
    for service in ("", "genie.v1.JobService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _redis_text(url: str) -> str:
    """Every key and value in Redis (job records, indexes, Celery's queue), as one text."""
    client = redis.Redis.from_url(url)
    readers = {b"string": lambda key: [client.get(key)], b"list": lambda key: client.lrange(key, 0, -1),
               b"zset": lambda key: client.zrange(key, 0, -1), b"set": client.smembers,
               b"hash": lambda key: [item for pair in client.hgetall(key).items() for item in pair]}
    parts = []
    for key in client.scan_iter():
        parts += [key, *readers[client.type(key)](key)]
    return "\n".join(part.decode(errors="replace") for part in parts)


def test_keys_never_appear_in_logs_or_job_records(deployment, secured, caplog):
    stub = jobs_pb2_grpc.JobServiceStub(secured[1])
    with caplog.at_level(logging.DEBUG):
        job_id = _submit(stub, ALICE).job_id
        _submit(stub, BOB)
        stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=bearer(ALICE))
        failure(stub.ListJobs, pb.ListJobsRequest(), bearer("wrong-" + ALICE))
        failure(stub.SubmitJob, pb.SubmitJobRequest(dataset="squares", preset="tiny"), bearer(READER))
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert "job submitted" in logged and "'owner': 'alice'" in logged
    stored = _redis_text(deployment.redis_url)
    assert '"owner": "alice"' in stored and job_id in stored
    for key in (ALICE, BOB, READER, hash_key(ALICE), hash_key(BOB)):
        assert key not in logged and key not in stored


def test_job_service_with_auth_on_and_no_keys_refuses_to_start(deployment):
    with pytest.raises(ValueError, match="no API keys are configured: set GENIE_JOBS_API_KEYS_FILE"):
        deployment.start(api_keys_file=None)


def _write_record_without_owner(redis_url: str, job_id: str) -> None:
    """A job record as written before jobs had owners: no "owner" field, in the all-jobs index only."""
    fields = asdict(JobRecord(job_id=job_id, dataset="squares", preset="tiny", model_name="old", created_at=1.0))
    del fields["owner"]
    client = redis.Redis.from_url(redis_url)
    client.set(f"genie:job:{job_id}", json.dumps(fields))
    client.zadd("genie:jobs", {job_id: 1.0})


def test_old_records_without_an_owner_are_visible_only_with_auth_off(deployment, secured):
    _write_record_without_owner(deployment.redis_url, "job-from-before")
    stub = jobs_pb2_grpc.JobServiceStub(secured[1])
    code, _ = failure(stub.GetJob, pb.GetJobRequest(job_id="job-from-before"), bearer(ALICE))
    assert code == grpc.StatusCode.NOT_FOUND
    alices = stub.ListJobs(pb.ListJobsRequest(), metadata=bearer(ALICE)).jobs
    assert "job-from-before" not in {job.job_id for job in alices}
    open_runtime = deployment.start(auth="none", api_keys_file=None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{open_runtime.port}") as channel:
            anyone = jobs_pb2_grpc.JobServiceStub(channel)
            old = anyone.GetJob(pb.GetJobRequest(job_id="job-from-before"), timeout=10)
            assert (old.model_name, old.owner) == ("old", "")
            job_id = anyone.SubmitJob(pb.SubmitJobRequest(dataset="squares", preset="tiny"), timeout=10).job_id
            assert {"job-from-before", job_id} <= {job.job_id for job in anyone.ListJobs(pb.ListJobsRequest()).jobs}
    finally:
        open_runtime.stop(grace_s=0)
    stored = json.loads(redis.Redis.from_url(deployment.redis_url).get(f"genie:job:{job_id}"))
    assert stored["owner"] == "anonymous"


def test_tls_job_service_serves_tls_clients_with_a_key_and_refuses_plaintext(deployment, tmp_path):
    certs = certificates(tmp_path)
    runtime = deployment.start(tls_cert_file=certs["server.pem"], tls_key_file=certs["server.key"])
    address = f"localhost:{runtime.port}"
    try:
        with open_channel(address, ALICE, certs["ca.pem"]) as channel:
            assert jobs_pb2_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10) is not None
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as error:
            jobs_pb2_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest(), metadata=bearer(ALICE), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        runtime.stop(grace_s=0)


def test_cli_sends_the_key_from_a_file_or_genie_api_key(secured, tmp_path):
    def genie(*args: str, key: str | None = None) -> subprocess.CompletedProcess:
        env = {name: value for name, value in os.environ.items() if name != "GENIE_API_KEY"}
        return subprocess.run(["nice", "-n", "19", GENIE, "jobs", "--address", f"127.0.0.1:{secured[0].port}", *args],
                              capture_output=True, text=True, timeout=120,
                              env=env | ({"GENIE_API_KEY": key} if key else {}))

    key_file = tmp_path / "my.key"
    key_file.write_text(BOB + "\n")
    submitted = genie("--api-key-file", str(key_file), "submit", "--dataset", "squares", "--model-name", "cli")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and job_id.startswith("job-"), submitted.stderr
    assert job_id in genie("list", key=BOB).stdout
    assert job_id not in genie("list", key=ALICE).stdout
    refused = genie("watch", job_id)
    assert refused.returncode == 2 and "error: UNAUTHENTICATED: no API key" in refused.stderr
