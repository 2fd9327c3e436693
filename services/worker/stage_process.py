"""One stage of a job, run in its own process by the worker (`python -m services.worker.stage_process SPEC`).

A separate process can be stopped at once on cancel and holds the stage's memory; the worker supervising it
stays responsive (heartbeats, progress, checkpoint sync). Progress goes to a JSON file the worker reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path

from genie_models.allocator import keep_freed_memory
from genie_models.training import common as training_common


class FileProgress(training_common.Progress):
    """The training loops' progress, written to a JSON file for the worker (no bar: nobody watches the log);
    only by the reporting rank (enabled). The training functions take `partial(FileProgress, path)`."""

    def __init__(self, path: Path, stage: str, start: int, total: int, frames_per_step: int, enabled: bool):
        super().__init__(stage, start, total, frames_per_step, enabled=False)
        self.path, self.enabled, self.start, self.total, self.last_write = path, enabled, start, total, 0.0
        self._write({"step": start, "total_steps": total, "resumed_from_step": start, "metrics": {}})

    def update(self, metrics: dict[str, float]) -> float:
        frames_per_second = super().update(metrics)
        now = time.monotonic()
        step = self.start + self.steps
        if now - self.last_write > 0.2 or step == self.total:
            steps_per_second = frames_per_second / max(self.frames_per_step, 1)
            self._write({"step": step, "total_steps": self.total, "resumed_from_step": self.start,
                         "metrics": metrics, "frames_per_second": frames_per_second,
                         "eta_seconds": (self.total - step) / max(steps_per_second, 1e-9)})
            self.last_write = now
        return frames_per_second

    def _write(self, state: dict) -> None:
        if not self.enabled:
            return
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.path)


def run(spec: dict) -> None:
    import torch

    from genie_models.data import EpisodeDataset, ingest_video_folder
    from genie_models.dynamics import DYNAMICS_PRESETS
    from genie_models.lam import LAM_PRESETS
    from genie_models.tokenizer import TOKENIZER_PRESETS
    from genie_models.training import dynamics as dynamics_training
    from genie_models.training import tokenizer as tokenizer_training

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    make_progress = partial(FileProgress, Path(spec["progress_file"]))
    preset, overrides, stage = spec["preset"], spec["overrides"], spec["stage"]
    if stage == "data":
        ingest_video_folder(spec["videos_dir"], spec["data_dir"], frame_size=TOKENIZER_PRESETS[preset].image_size,
                            seed=overrides.get("seed", 0), progress=False)
        return
    dataset = EpisodeDataset.open(spec["data_dir"])
    if stage == "tokenizer":
        config = training_config(tokenizer_training.TOKENIZER_TRAINING[preset], overrides, "tokenizer_steps")
        tokenizer_training.train_tokenizer(dataset, TOKENIZER_PRESETS[preset], config, Path(spec["tokenizer_run"]),
                                           spec.get("device"), make_progress=make_progress)
    elif stage == "dynamics":
        config = training_config(dynamics_training.DYNAMICS_TRAINING[preset], overrides, "dynamics_steps")
        lam_first = dynamics_training.LAM_FIRST.get(preset)
        if lam_first is not None and overrides.get("lam_steps") == 0:
            lam_first = None
        elif lam_first is not None:
            lam_first = training_config(lam_first, overrides, "lam_steps")
        tokenizer = tokenizer_training.load_tokenizer(Path(spec["tokenizer_run"]))
        dynamics_training.train_dynamics(dataset, tokenizer, LAM_PRESETS[preset], DYNAMICS_PRESETS[preset], config,
                                         Path(spec["dynamics_run"]), spec.get("device"), lam_first=lam_first,
                                         make_progress=make_progress)
    elif stage == "eval":
        evaluate(spec, dataset, overrides)
    else:
        raise ValueError(f"stage {stage!r} does not run in a stage process")


def training_config(base, overrides: dict[str, int], steps_key: str):
    values = {"steps": overrides.get(steps_key), "batch_size": overrides.get("batch_size"),
              "checkpoint_every": overrides.get("checkpoint_every"), "seed": overrides.get("seed")}
    config = replace(base, **{key: value for key, value in values.items() if value is not None})
    return replace(config, warmup_steps=min(config.warmup_steps, max(1, config.steps // 10)))


def evaluate(spec: dict, dataset, overrides: dict[str, int]) -> None:
    from genie_models.checkpoints import latest_checkpoint
    from genie_models.evaluation import EvalConfig, evaluate_world
    from genie_models.world_model import WorldModel

    checkpoint = latest_checkpoint(Path(spec["dynamics_run"]))
    world = WorldModel.load(checkpoint)
    clips = overrides.get("eval_clips", EvalConfig().num_clips)
    horizon = overrides.get("eval_horizon", EvalConfig().horizon)
    metrics = evaluate_world(world, dataset, EvalConfig(num_clips=clips, horizon=horizon, batch_size=min(16, clips),
                                                        seed=overrides.get("seed", 0)))
    step = int(checkpoint.name.split("-")[-1])
    world.save(Path(spec["world_dir"]), step=step, metrics=metrics)
    Path(spec["metrics_file"]).write_text(json.dumps(metrics))


def main() -> None:
    keep_freed_memory()
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        run(spec)
    except BaseException as error:  # the worker reads the cause from the error file, then fails the job
        Path(spec["error_file"]).write_text(f"{type(error).__name__}: {error}"[:2000])
        traceback.print_exc()
        raise SystemExit(1)


if __name__ == "__main__":
    main()
