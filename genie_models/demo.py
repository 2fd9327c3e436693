"""The main job end to end on one machine: CoinRun data, the tokenizer, LAM + dynamics, evaluation,
and the pictures in `out/demo/`. Every stage resumes from what an interrupted run left behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genie_models.checkpoints import latest_checkpoint
from genie_models.data import EpisodeDataset, generate_coinrun, ingest_video_folder, iterate_heldout
from genie_models.dynamics import DYNAMICS_PRESETS
from genie_models.evaluation import (EvalConfig, evaluate_world, long_play, prompt_fidelity, world_beats_still_image,
                                     write_metrics)
from genie_models.lam import LAM_PRESETS
from genie_models.render import (action_grid_frames, drawn_prompts, frame_strip, reconstruction_image, save_gif,
                                 save_mp4)
from genie_models.tokenizer import TOKENIZER_PRESETS
from genie_models.training.dynamics import DYNAMICS_TRAINING, LAM_FIRST, train_dynamics
from genie_models.training.tokenizer import TOKENIZER_TRAINING, train_tokenizer


@dataclass(frozen=True)
class DemoData:
    episodes: int
    steps_per_episode: int


DEMO_DATA = {"tiny": DemoData(episodes=400, steps_per_episode=120),
             "coinrun": DemoData(episodes=10_000, steps_per_episode=1_000)}


def _stage(message: str, started: float) -> None:
    """A stage's heading, with the minutes spent since `started` (where the demo's time goes)."""
    print(f"\n== {message} (at {(time.perf_counter() - started) / 60:.1f} min)", flush=True)


def _dataset(out: Path, spec: DemoData, videos: Path | None) -> EpisodeDataset:
    root = out / "data" / ("videos" if videos else "coinrun")
    if (root / "index.json").exists():
        return EpisodeDataset.open(root)
    if videos:
        return ingest_video_folder(videos, root, frame_size=64, heldout_fraction=0.1, seed=0)
    return generate_coinrun(root, spec.episodes, spec.steps_per_episode, heldout_fraction=0.1, seed=0)


def run_demo(preset: str, out: Path, device: str | None = None, videos: Path | None = None) -> dict[str, float]:
    """The main job; with `videos`, a folder of ordinary videos replaces the generated CoinRun levels."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    source = f"videos from {videos}" if videos else f"CoinRun episodes ({DEMO_DATA[preset].episodes} levels, procgen)"
    _stage(f"1/5 {source}", started)
    dataset = _dataset(out, DEMO_DATA[preset], videos)
    _stage("2/5 video tokenizer (VQ-VAE)", started)
    tokenizer = train_tokenizer(dataset, TOKENIZER_PRESETS[preset], TOKENIZER_TRAINING[preset],
                                out / "runs" / "tokenizer", device).tokenizer
    _stage("3/5 latent action model + dynamics", started)
    world = train_dynamics(dataset, tokenizer, LAM_PRESETS[preset], DYNAMICS_PRESETS[preset],
                           DYNAMICS_TRAINING[preset], out / "runs" / "world", device, lam_first=LAM_FIRST[preset]).world
    world.to("cpu").eval()
    _stage("4/5 evaluation on held-out levels", started)
    metrics = evaluate_world(world, dataset, EvalConfig())
    prompts = next(iterate_heldout(dataset, 1, 4, batch_size=4)).frames[:, 0].numpy()  # long play, action grid
    long_rollout, long_metrics = long_play(world, prompts, num_steps=200)
    outside, outside_metrics = prompt_fidelity(world, drawn_prompts(world.image_size), num_steps=8)
    metrics |= long_metrics | outside_metrics
    step = int(latest_checkpoint(out / "runs" / "world").name.split("-")[-1])
    world.save(out / "world", step=step, metrics=metrics)
    print(write_metrics(metrics, out / "metrics.json"))
    print("\n".join(f"{check}: {'yes' if passed else 'NO'}" for check, passed in world_beats_still_image(metrics).items()))
    _stage("5/5 pictures", started)
    grid = action_grid_frames(world, prompts, num_steps=12)
    save_gif(grid, out / "action_grid.gif")
    save_mp4(grid, out / "action_grid.mp4")
    reconstruction_frames = next(iterate_heldout(dataset, 1, 8, batch_size=8)).frames[:, 0].numpy()
    reconstruction_image(world, np.ascontiguousarray(reconstruction_frames)).save(out / "reconstruction.png")
    every_tenth = np.concatenate([prompts[:, None], long_rollout.frames[:, 9::10]], axis=1)  # [4, 21, ...]
    frame_strip(every_tenth.reshape(-1, *every_tenth.shape[2:]), columns=every_tenth.shape[1]).save(
        out / "long_rollout.png")
    for (name, picture), frames in zip(drawn_prompts(world.image_size).items(), outside.frames):
        frame_strip(np.concatenate([picture[None], frames]), columns=9).save(out / f"outside_prompt_{name}.png")
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs in {out}/:")
    for name in ("action_grid.gif", "action_grid.mp4", "reconstruction.png", "long_rollout.png",
                 "outside_prompt_*.png", "metrics.json", "world/"):
        print(f"  {out / name}")
    print(f"Play it: genie play --world {out / 'world'} --image <any.png>")
    return metrics
