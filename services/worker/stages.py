"""Runs one stage of one job on this worker: inputs from the store, the stage's process, progress and
checkpoint sync while it runs, outputs back to the store. Everything a later stage (maybe on another
worker) needs is in the store when a stage ends.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from genie_models.checkpoints import MANIFEST_NAME
from services import die_with_parent
from services.jobs.records import CANCELLED, JobRecord, JobRecords
from services.settings import WorkerSettings
from services.stores.base import ObjectStore
from services.stores.catalog import ModelCatalog
from services.stores.datasets import download_videos
from services.stores.runs import RunSync
from services.stores.transfer import get_checkpoint, get_tree, put_checkpoint, put_tree
from services.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)
DONE, STOPPED = "done", "stopped"  # stopped: cancelled, or the lease went to another worker


class StageFailed(RuntimeError):
    """The stage cannot succeed by retrying (bad data, a diverged run, ...); the message says why."""


class StageCrashed(RuntimeError):
    """The stage's process was killed (OOM, a signal): worth retrying from the last checkpoint."""


@dataclass(frozen=True)
class JobPaths:
    root: Path

    def __getattr__(self, name: str) -> Path:
        names = {"videos": "videos", "data": "data", "tokenizer_run": "runs/tokenizer",
                 "dynamics_run": "runs/dynamics", "world": "world"}
        if name not in names:
            raise AttributeError(name)
        return self.root / names[name]


def store_prefix(job_id: str, part: str) -> str:
    return f"jobs/{job_id}/{part}"


def run_sync(store: ObjectStore, job_id: str, run: str, paths: JobPaths, keep: int) -> RunSync:
    """The store mirror of one run of a job: tokenizer, dynamics, or dynamics-lam (the LAM-alone phase)."""
    local = {"tokenizer": paths.tokenizer_run, "dynamics": paths.dynamics_run,
             "dynamics-lam": paths.dynamics_run / "lam"}
    return RunSync(store, local[run], store_prefix(job_id, f"runs/{run}"), keep)


class StageRunner:
    def __init__(self, settings: WorkerSettings, store: ObjectStore, records: JobRecords, metrics: WorkerMetrics):
        self.settings, self.store, self.records, self.metrics = settings, store, records, metrics

    def run(self, job: JobRecord, stage: str, lease_lost: threading.Event) -> str:
        paths = JobPaths(Path(self.settings.scratch_dir) / job.job_id)
        paths.root.mkdir(parents=True, exist_ok=True)
        if stage == "data":
            return self._ingest(job, paths, lease_lost)
        if stage == "publish":
            return self._publish(job, paths)
        self._ensure_data(job, paths)
        tokenizer = self._sync(job, "tokenizer", paths)
        dynamics = self._sync(job, "dynamics", paths)
        if stage == "tokenizer":
            tokenizer.pull()
            return self._process(job, stage, paths, [tokenizer], lease_lost)
        if stage == "dynamics":
            self._require(tokenizer)
            lam = self._sync(job, "dynamics-lam", paths)  # the LAM-alone phase, if any
            lam.pull()
            dynamics.pull()
            return self._process(job, stage, paths, [lam, dynamics], lease_lost)
        self._require(dynamics)
        outcome = self._process(job, stage, paths, [], lease_lost)
        if outcome == DONE:
            metrics = json.loads((paths.root / "metrics.json").read_text())
            put_checkpoint(self.store, paths.world, store_prefix(job.job_id, "world"))
            self.records.update(job.job_id, lambda r: setattr(r, "eval_metrics", metrics))
        return outcome

    def _require(self, sync: RunSync) -> None:
        if sync.pull() == 0:
            raise StageFailed(f"no checkpoint under {sync.prefix} in the {self.store.description}: "
                              "its stage left none (deleted?)")

    def _ingest(self, job: JobRecord, paths: JobPaths, lease_lost: threading.Event) -> str:
        outcome = DONE
        if not (paths.data / "index.json").is_file():  # an earlier attempt here may have finished ingesting
            shutil.rmtree(paths.data, ignore_errors=True)  # or left part of it
            download_videos(self.store, job.dataset, paths.videos)
            outcome = self._process(job, "data", paths, [], lease_lost)
        if outcome == DONE:
            put_tree(self.store, paths.data, store_prefix(job.job_id, "data"), last="index.json")
        return outcome

    def _sync(self, job: JobRecord, run: str, paths: JobPaths) -> RunSync:
        return run_sync(self.store, job.job_id, run, paths, self.settings.keep_checkpoints)

    def _ensure_data(self, job: JobRecord, paths: JobPaths) -> None:
        if not (paths.data / "index.json").is_file():
            get_tree(self.store, store_prefix(job.job_id, "data"), paths.data, marker="index.json")

    def _publish(self, job: JobRecord, paths: JobPaths) -> str:
        started = time.perf_counter()
        if not (paths.world / MANIFEST_NAME).is_file():
            get_checkpoint(self.store, store_prefix(job.job_id, "world"), paths.world)
        catalog = ModelCatalog(self.store)
        version = job.model_version
        if not version:  # reserve once, so a retried publish rewrites the same version instead of adding one
            with self.records.lock(f"publish:{job.model_name}"):
                version = catalog.next_version(job.model_name)
                self.records.update(job.job_id, lambda r: setattr(r, "model_version", version))
        catalog.publish(job.model_name, paths.world, version)
        self.metrics.publish_duration.observe(time.perf_counter() - started)
        return DONE

    def _process(self, job: JobRecord, stage: str, paths: JobPaths, syncs: list[RunSync],
                 lease_lost: threading.Event) -> str:
        progress, error = paths.root / f"{stage}.progress.json", paths.root / f"{stage}.error.txt"
        for stale in (progress, error):
            stale.unlink(missing_ok=True)
        spec = {"stage": stage, "preset": job.preset, "overrides": job.overrides, "device": self.settings.device,
                "videos_dir": str(paths.videos), "data_dir": str(paths.data),
                "tokenizer_run": str(paths.tokenizer_run), "dynamics_run": str(paths.dynamics_run),
                "world_dir": str(paths.world), "metrics_file": str(paths.root / "metrics.json"),
                "progress_file": str(progress), "error_file": str(error)}
        spec_path = paths.root / f"{stage}.spec.json"
        spec_path.write_text(json.dumps(spec))
        with (paths.root / f"{stage}.log").open("ab") as log:
            # SIGKILL when the worker dies, so no orphan keeps training.
            stage_command = [sys.executable, "-m", "services.worker.stage_process", str(spec_path)]
            process = subprocess.Popen(die_with_parent.command(stage_command, signal.SIGKILL),
                                       stdout=log, stderr=subprocess.STDOUT)
        logger.info("stage %s of %s started as pid %d", stage, job.job_id, process.pid)
        return self._supervise(job.job_id, stage, process, progress, error, syncs, lease_lost)

    def _supervise(self, job_id: str, stage: str, process: subprocess.Popen, progress: Path, error: Path,
                   syncs: list[RunSync], lease_lost: threading.Event) -> str:
        last_step = None
        while True:
            code = process.poll()
            state = _read_json(progress)
            if state:
                last_step = self._report(job_id, stage, state, last_step)
            self._push(job_id, stage, syncs)
            if code is not None:
                break
            if lease_lost.is_set() or self.records.get(job_id).state == CANCELLED:
                self._stop(process)
                self._push(job_id, stage, syncs)  # keep the last good checkpoint
                return STOPPED
            time.sleep(self.settings.poll_s)
        self.metrics.frames_per_second.labels(stage).set(0)
        if code == 0:
            return DONE
        if code < 0:
            raise StageCrashed(f"the {stage} process was killed by signal {-code}")
        cause = error.read_text() if error.is_file() else f"exit code {code}, no error recorded"
        raise StageFailed(f"{stage} stage failed: {cause}")

    def _push(self, job_id: str, stage: str, syncs: list[RunSync]) -> None:
        for sync in syncs:
            if key := sync.push():
                self.metrics.checkpoints_synced.labels(stage).inc()
                self.records.update(job_id, lambda r: setattr(r, "last_checkpoint", key))

    def _report(self, job_id: str, stage: str, state: dict, last_step: int | None) -> int:
        step, resumed_from = int(state.get("step", 0)), int(state.get("resumed_from_step", 0))
        # Count from where this attempt started: a short stage may be first seen already finished.
        previous = resumed_from if last_step is None else last_step
        if step > previous:
            self.metrics.training_steps.labels(stage).inc(step - previous)
        elif step < previous:  # the stage's next phase (dynamics after the LAM)
            self.metrics.training_steps.labels(stage).inc(step - resumed_from)
        self.metrics.frames_per_second.labels(stage).set(float(state.get("frames_per_second", 0.0)))

        def change(record: JobRecord) -> bool:
            if record.step == step and record.total_steps == state.get("total_steps"):
                return False
            record.step, record.total_steps = step, int(state.get("total_steps", 0))
            record.resumed_from_step = int(state.get("resumed_from_step", 0))
            record.losses = {k: float(v) for k, v in state.get("metrics", {}).items() if k != "frames_per_second"}
            record.frames_per_second = float(state.get("frames_per_second", 0.0))
            record.eta_seconds = float(state.get("eta_seconds", 0.0))
            return True
        self.records.update(job_id, change)
        return step

    def _stop(self, process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.settings.cancel_grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

