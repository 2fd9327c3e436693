"""Training jobs end to end: the job service, real `genie worker` processes, a private Redis and SeaweedFS S3.

Worker deaths are real SIGKILLs of the worker's process group; the S3 restart is a SIGKILL and restart of
the SeaweedFS server on the same ports and data.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest

from genie.v1 import jobs_pb2 as pb
from genie_models.world_model import WorldModel
from services.settings import StoreSettings
from services.stores.base import open_store
from services.stores.catalog import ModelCatalog
from services.stores.datasets import upload_videos
from services.stores.runs import RunSync
from services.stores.transfer import get_checkpoint
from tests.services.helpers import free_port
from tests.services.jobs_harness import jobs_stack, write_videos  # noqa: F401 - fixture
from tests.services.jobs_servers import redis_server, s3_server  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def store_of(stack):
    return open_store(StoreSettings(**{k.removeprefix("GENIE_STORE_").lower(): v for k, v in stack.store_env().items()}))


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.mark.parametrize("dataset, preset, overrides, expected", [
    ("squares", "huge", {}, "unknown preset 'huge'"),
    ("squares", "tiny", {"learning_rate": "1"}, "unknown override 'learning_rate'"),
    ("squares", "tiny", {"tokenizer_steps": "0"}, "out of range"),
    ("squares", "tiny", {"batch_size": "many"}, "not an integer"),
    ("no-such-videos", "tiny", {}, "genie datasets upload DIR --name no-such-videos"),
])
def test_submit_with_bad_preset_override_or_dataset_is_invalid_argument(jobs_stack, dataset, preset, overrides,
                                                                         expected):
    with pytest.raises(grpc.RpcError) as raised:
        jobs_stack.stub().SubmitJob(pb.SubmitJobRequest(dataset=dataset, preset=preset, overrides=overrides))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in raised.value.details()


def test_job_publishes_one_version_through_an_s3_restart_and_streams_progress(jobs_stack, tmp_path):
    """The whole pipeline; the S3 server is SIGKILLed as the publish stage starts and restarted 2 s later."""
    worker = jobs_stack.start_worker("happy")
    try:
        job = jobs_stack.submit("squares-happy")
        restarted = threading.Thread(target=_restart_s3_at_publish, args=(jobs_stack, job.job_id), daemon=True)
        restarted.start()
        seen = list(jobs_stack.stub().WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=900))
        restarted.join(60)
        final = seen[-1]
        assert final.state == pb.JOB_STATE_SUCCEEDED, (final, worker.tail())
        assert {pb.JOB_STAGE_TOKENIZER, pb.JOB_STAGE_DYNAMICS, pb.JOB_STAGE_PUBLISH} <= {u.stage for u in seen}
        training = [u for u in seen if u.stage == pb.JOB_STAGE_TOKENIZER and u.step > 0]
        assert training and training[-1].total_steps == 3 and "loss" in training[-1].losses
        assert final.model_version == "1" and "generation_psnr_t4" in final.eval_metrics
        catalog = ModelCatalog(store_of(jobs_stack), tmp_path / "cache")
        assert catalog.versions("squares-happy") == [1]  # retried, published once
        model, local = catalog.load("squares-happy")
        assert model.version == 1 and WorldModel.load(local).num_actions > 0
        worker_metrics = scrape(worker.metrics_port)
        assert 'genie_training_steps_total{stage="tokenizer"} 3.0' in worker_metrics
        assert "genie_publish_duration_seconds_count 1.0" in worker_metrics
        assert 'genie_jobs{state="succeeded"}' in scrape(jobs_stack.metrics_port)
    finally:
        worker.kill()


def _restart_s3_at_publish(stack, job_id: str) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and stack.records.get(job_id).stage != "publish":
        time.sleep(0.01)
    stack.s3.stop(kill=True)
    time.sleep(2)
    stack.s3.start()


def test_sigkilled_worker_is_redelivered_and_resumes_from_its_last_checkpoint(jobs_stack):
    first = jobs_stack.start_worker("doomed")
    second = None
    try:
        job = jobs_stack.submit("squares-killed", tokenizer_steps="400", checkpoint_every="2")
        checkpointed = jobs_stack.wait(job.job_id, lambda r: r.stage == "tokenizer" and r.last_checkpoint != "",
                                       timeout_s=300, workers=(first,))
        first.kill()
        killed_at_step = int(jobs_stack.records.get(job.job_id).last_checkpoint.rsplit("-", 1)[1])
        second = jobs_stack.start_worker("rescuer")
        resumed = jobs_stack.wait(job.job_id, lambda r: r.attempt == 2 and r.step > r.resumed_from_step,
                                  timeout_s=300, workers=(first, second))
        assert resumed.resumed_from_step >= killed_at_step >= 2, resumed  # not step 0
        assert checkpointed.attempt == 1 and resumed.stage == "tokenizer"
        store = store_of(jobs_stack)
        sync = RunSync(store, jobs_stack.tmp / "verify", f"jobs/{job.job_id}/runs/tokenizer")
        for name in sync.stored_steps():  # every listed checkpoint is whole and passes its checksums
            get_checkpoint(store, f"{sync.prefix}/{name}", jobs_stack.tmp / "verify" / name)
        assert ModelCatalog(store).versions("squares-killed") == []
    finally:
        jobs_stack.stub().CancelJob(pb.CancelJobRequest(job_id=job.job_id))
        first.kill()
        if second:
            second.kill()


def test_cancel_stops_the_stage_within_seconds_keeps_its_checkpoint_and_is_not_redelivered(jobs_stack):
    worker = jobs_stack.start_worker("cancel")
    try:
        job = jobs_stack.submit("squares-cancel", tokenizer_steps="400", checkpoint_every="2")
        jobs_stack.wait(job.job_id, lambda r: r.stage == "tokenizer" and r.last_checkpoint != "", timeout_s=300,
                        workers=(worker,))
        cancelled = jobs_stack.stub().CancelJob(pb.CancelJobRequest(job_id=job.job_id))
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        stopped = jobs_stack.wait(job.job_id, lambda r: r.stopped_at > 0, timeout_s=30, workers=(worker,))
        assert stopped.stopped_at - stopped.cancel_requested_at < 10, stopped
        time.sleep(10)  # past the 6 s visibility timeout: a redelivery would have started by now
        later = jobs_stack.records.get(job.job_id)
        assert later.state == "cancelled" and later.attempt == 1 and later.step == stopped.step
        assert worker.tail().count(f"stage tokenizer of {job.job_id} started") == 1
        store = store_of(jobs_stack)
        get_checkpoint(store, stopped.last_checkpoint, jobs_stack.tmp / "kept")  # whole, checksums pass
        assert worker.process.poll() is None  # the worker itself lives on
    finally:
        worker.kill()


@pytest.mark.parametrize("fault, expected", [
    ("credentials", "refused the credentials (SignatureDoesNotMatch)"),
    ("unreachable", "is unreachable"),
    ("deleted", "datasets/fragile/clip1.mp4 (listed in datasets/fragile/dataset.json) is missing"),
])
def test_store_fault_fails_the_job_with_a_message_naming_the_cause(jobs_stack, tmp_path, fault, expected):
    overrides = {"credentials": {"GENIE_STORE_S3_SECRET_KEY": "wrong-secret"},
                 "unreachable": {"GENIE_STORE_S3_ENDPOINT": f"127.0.0.1:{free_port()}", "GENIE_STORE_RETRY_S": "1"},
                 "deleted": {}}[fault]
    dataset = "squares"
    if fault == "deleted":
        store = store_of(jobs_stack)
        upload_videos(store, write_videos(tmp_path / "videos"), "fragile")
        store.delete("datasets/fragile/clip1.mp4")
        dataset = "fragile"
    worker = jobs_stack.start_worker(f"fault-{fault}", **overrides)
    try:
        job = jobs_stack.submit(f"fault-{fault}", dataset=dataset)
        failed = jobs_stack.wait(job.job_id, lambda r: r.finished, timeout_s=300, workers=(worker,))
        assert failed.state == "failed" and expected in failed.error, failed.error
        assert "wrong-secret" not in failed.error and jobs_stack.s3.secret_key not in failed.error
    finally:
        worker.kill()


def test_cli_submits_lists_cancels_and_watches_a_job(jobs_stack):
    import subprocess

    import os

    from tests.services.jobs_harness import API_KEY, GENIE

    def genie(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([GENIE, "jobs", "--address", f"127.0.0.1:{jobs_stack.port}", *args],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "GENIE_API_KEY": API_KEY})

    submitted = genie("submit", "--dataset", "squares", "--model-name", "cli", "--set", "tokenizer_steps=2")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and job_id.startswith("job-"), submitted.stderr
    listed = genie("list").stdout
    assert job_id in listed and "queued" in listed
    assert '"state": "JOB_STATE_CANCELLED"' in genie("cancel", job_id).stdout
    watched = genie("watch", job_id)
    assert watched.returncode == 1 and f"{job_id}: cancelled" in watched.stdout
    bad = genie("submit", "--dataset", "squares", "--set", "learning_rate=1")
    assert bad.returncode == 2 and "INVALID_ARGUMENT: unknown override 'learning_rate'" in bad.stderr
