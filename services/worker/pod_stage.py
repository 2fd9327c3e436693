"""A training stage run by a Kubernetes indexed Job (services/worker/k8s_job.py) rather than by a Celery worker:
`stage_in` fills a pod's scratch directory from the store before torchrun starts, and `stage_out` pushes the
checkpoints rank 0 writes (on the pod of index 0) beside it, so a failed or rescheduled pod resumes.

The layout in the store is the worker's (services/worker/stages.py): a job started either way can go on the other.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from services.stores.base import ObjectNotFound, ObjectStore
from services.stores.datasets import download_videos
from services.stores.runs import RunSync
from services.stores.transfer import get_tree
from services.worker.stages import JobPaths, StageFailed, run_sync, store_prefix

logger = logging.getLogger(__name__)
RUNS_WRITTEN = {"tokenizer": ("tokenizer",), "dynamics": ("dynamics-lam", "dynamics")}  # stage -> its runs


def stage_in(store: ObjectStore, job_id: str, dataset: str, preset: str, stage: str, root: Path, seed: int = 0,
             keep: int = 2) -> None:
    """The job's ingested clips (ingested here from the dataset's videos if no stage has stored them yet, the
    same way on every pod) and the newest checkpoint of each run the stage reads or resumes."""
    paths = JobPaths(Path(root))
    if not (paths.data / "index.json").is_file():
        try:
            get_tree(store, store_prefix(job_id, "data"), paths.data, marker="index.json")
        except ObjectNotFound:
            from genie_models.data import ingest_video_folder
            from genie_models.tokenizer import TOKENIZER_PRESETS

            download_videos(store, dataset, paths.videos)
            ingest_video_folder(paths.videos, paths.data, frame_size=TOKENIZER_PRESETS[preset].image_size, seed=seed,
                                progress=False)
    tokenizer = run_sync(store, job_id, "tokenizer", paths, keep).pull()
    if stage == "dynamics" and tokenizer == 0:
        raise StageFailed(f"job {job_id} has no tokenizer checkpoint in the {store.description}: "
                          "run its tokenizer stage first")
    for run in RUNS_WRITTEN[stage]:
        step = run_sync(store, job_id, run, paths, keep).pull()
        logger.info("%s: resuming from step %d", run, step)


def stage_out(store: ObjectStore, job_id: str, stage: str, root: Path, every_s: float = 10.0,
              stop: threading.Event | None = None, keep: int = 2) -> int:
    """Push each new checkpoint of the stage's runs until stop is set (or SIGTERM, which Kubernetes sends a
    sidecar once the trainer has exited), then once more; returns how many checkpoints went up."""
    stop = stop or _stop_on_sigterm()
    syncs = [run_sync(store, job_id, run, JobPaths(Path(root)), keep) for run in RUNS_WRITTEN[stage]]
    for sync in syncs:
        sync.pushed = sync.latest_stored()  # what stage_in pulled is there already
    pushed = 0
    while True:
        stopping = stop.wait(every_s)
        pushed += _push(syncs)
        if stopping:
            return pushed


def _push(syncs: list[RunSync]) -> int:
    pushed = 0
    for sync in syncs:
        if key := sync.push():
            logger.info("pushed %s", key)
            pushed += 1
    return pushed


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop
