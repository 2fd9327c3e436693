"""Training under a real `torchrun` on CPU (gloo): two processes train like one on the same global batch, with
DDP and with FSDP; checkpoints are full safetensors written by rank 0, resume, and load in a single process.

Why the runs can match: the batch size is global and every rank draws the same global batch, keeping its
contiguous share (ClipSampler's shard); DDP and FSDP average gradients over ranks, which for the tokenizer's
per-element mean losses is the one-process gradient; VQ usage is counted over all ranks and dead-code
restarts pick from the global batch. What still differs is float summation order (a gradient summed over the
whole batch vs two halves summed then averaged), so parameters are compared through their updates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genie_models.checkpoints import load_checkpoint
from genie_models.data.shards import EpisodeDataset, EpisodeWriter
from genie_models.tokenizer import TOKENIZER_PRESETS, VideoTokenizer
from genie_models.training.tokenizer import load_tokenizer
from genie_models.world_model import WorldModel

pytestmark = pytest.mark.slow

SIZES = ("--preset", "tiny", "--device", "cpu")
TOKENIZER = ("--batch-size", "4", "--clip-length", "1")
DYNAMICS = ("--batch-size", "2", "--clip-length", "2", "--lam-steps", "2")
# |update(2 processes) - update(1 process)| / |update(1 process)| after 2 and 4 AdamW steps, an update being
# the parameters minus their shared initial values. Measured 8e-11 to 1e-10 (DDP and FSDP): float rounding.
# The same test with rank 1 drawing its own clips (a per-rank sampler seed) measured 2.7e-2.
UPDATE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four 8-frame 64x64 episodes of a square drifting over noise: tiny, generated, deterministic."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    with EpisodeWriter(root, source="squares", frame_size=64) as writer:
        for episode in range(4):
            frames = rng.integers(0, 64, (8, 64, 64, 3), dtype=np.uint8)
            for t in range(8):
                x = 4 * t + 8 * episode
                frames[t, 20:36, x:x + 16] = (200, 60 + 40 * episode, 30)
            writer.add_episode(frames, np.zeros(7, dtype=np.int16), "train")
    EpisodeDataset.open(root)
    return root


def genie_train(stage: str, data: Path, run: Path, steps: int, processes: int, *flags: str) -> None:
    """`genie train <stage>` as a user runs it: alone, or under torchrun with N CPU processes."""
    launcher = [sys.executable, "-m", "genie_models.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "genie_models.cli"]
    command = launcher + ["train", stage, "--data", str(data), "--run-dir", str(run), "--steps", str(steps),
                          *SIZES, *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def checkpoint(run: Path, step: int):
    return load_checkpoint(run / f"step-{step:08d}")


def relative_update_difference(run: Path, reference: Path, step: int) -> float:
    """|update(run) - update(reference)| / |update(reference)| over all tokenizer parameters, where an update
    is a parameter's value at `step` minus its initial value (the same seeded init in every run)."""
    torch.manual_seed(0)  # TrainConfig.seed: what train_tokenizer seeds before building the model
    initial = VideoTokenizer(TOKENIZER_PRESETS["tiny"]).state_dict()
    ours, theirs = checkpoint(run, step).tensors("tokenizer"), checkpoint(reference, step).tensors("tokenizer")
    assert ours.keys() == theirs.keys() == initial.keys()
    names = [name for name, value in initial.items() if value.is_floating_point() and name.split(".")[-1] != "usage"]
    difference = torch.cat([(ours[n] - theirs[n]).flatten() for n in names]).norm()
    update = torch.cat([(theirs[n] - initial[n]).flatten() for n in names]).norm()
    return float(difference / update)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    """The reference: one process, 2 steps, then resumed to 4."""
    run = tmp_path_factory.mktemp("one") / "run"
    genie_train("tokenizer", data, run, 2, 1, *TOKENIZER)
    genie_train("tokenizer", data, run, 4, 1, *TOKENIZER)
    return run


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_the_tokenizer_like_one_and_resume(data, one_process, tmp_path, sharding):
    run = tmp_path / "run"
    flag = "--fsdp" if sharding == "fsdp" else "--no-fsdp"
    genie_train("tokenizer", data, run, 2, 2, *TOKENIZER, flag)
    genie_train("tokenizer", data, run, 4, 2, *TOKENIZER, flag)  # resumes from step 2, as the reference did
    assert sorted(path.name for path in run.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    for step in (2, 4):
        difference = relative_update_difference(run, one_process, step)
        print(f"{sharding}: step {step}, relative update difference {difference:.2e}")
        assert difference < UPDATE_TOLERANCE
        ours, theirs = checkpoint(run, step).manifest.metrics, checkpoint(one_process, step).manifest.metrics
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)  # averaged over ranks = the global batch's
        assert ours["psnr"] == pytest.approx(theirs["psnr"], rel=1e-5)
    optimizer, reference = checkpoint(run, 4).tensors("optimizer"), checkpoint(one_process, 4).tensors("optimizer")
    assert optimizer.keys() == reference.keys()  # full (unsharded) optimizer state, in the single-process layout
    assert all(optimizer[name].shape == reference[name].shape for name in optimizer)
    frames = torch.from_numpy(np.array(EpisodeDataset.open(data).frames(0)[:1]))[None]
    assert load_tokenizer(run).encode(frames).shape == (1, 1, 16, 16)  # loads whole in this single process


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_both_dynamics_phases_resume_and_export_a_world_one_process_loads(
        data, one_process, tmp_path, sharding):
    """LAM alone, then dynamics against the frozen LAM. Not compared with one process: the dynamics loss masks
    tokens with each process's own random numbers, so the two runs draw different masks."""
    run, world_dir = tmp_path / "world", tmp_path / "exported"
    flags = (*DYNAMICS, "--tokenizer", str(one_process), "--fsdp" if sharding == "fsdp" else "--no-fsdp")
    genie_train("dynamics", data, run, 2, 2, *flags)
    genie_train("dynamics", data, run, 3, 2, *flags, "--world-out", str(world_dir))  # resumes both phases
    assert sorted(path.name for path in (run / "lam").iterdir()) == ["latest", "step-00000002"]
    assert checkpoint(run, 3).manifest.metrics["dynamics_loss"] > 0
    world = WorldModel.load(world_dir)  # written once, whole, loads in this single process
    final = WorldModel.load(run).dynamics.state_dict()
    assert all(torch.equal(value, final[name]) for name, value in world.dynamics.state_dict().items())
    prompt = torch.from_numpy(np.array(EpisodeDataset.open(data).frames(0)[:1]))[None]
    assert world.tokenizer.encode(prompt).shape == (1, 1, 16, 16)
