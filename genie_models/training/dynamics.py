"""Stage 2: the latent action model and the MaskGIT dynamics model on tokenized clips.

The LAM learns actions from pixels; dynamics learns to predict the next frame's tokens given the LAM's
(detached) action codes. The paper co-trains the two from the start; a preset may instead give the LAM a
phase of its own first (`LAM_FIRST`) and then train dynamics against the frozen LAM, so that the
dynamics model sees informative, stationary actions from its first step. The result, with the frozen
tokenizer, is a complete playable world.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genie_models.data import ClipSampler, EpisodeDataset
from genie_models.dynamics import DynamicsConfig, DynamicsModel
from genie_models.lam import LAMConfig, LatentActionModel
from genie_models.tokenizer import VideoTokenizer
from genie_models.training.common import (Distributed, Progress, ProgressFactory, RunCheckpoints, TrainConfig,
                                          autocast, make_optimizer, optimizer_step, setup_distributed,
                                          wrap_for_training)
from genie_models.world_model import WORLD_KIND, WorldModel, dynamics_config_for

DYNAMICS_TRAINING = {
    "tiny": TrainConfig(steps=250, batch_size=6, clip_length=8, learning_rate=1e-3, warmup_steps=25,
                        final_learning_rate=1e-4, checkpoint_every=125),
    "coinrun": TrainConfig(steps=200_000, batch_size=36, clip_length=16, learning_rate=3e-5, warmup_steps=5_000,
                           final_learning_rate=3e-6, checkpoint_every=5_000, fsdp=True),
}


LAM_KIND = "genie-lam"

# The LAM's own phase before dynamics (None: co-trained with dynamics from the start, as in the paper).
# Tiny: minutes of CPU do not let a co-trained LAM settle before the dynamics model has learned to
# ignore its still-random actions (README, "Why the world works").
LAM_FIRST = {
    "tiny": TrainConfig(steps=1000, batch_size=8, clip_length=8, learning_rate=1e-3, warmup_steps=25,
                        final_learning_rate=1e-4, checkpoint_every=500),
    "coinrun": None,
}


class CoTrained(torch.nn.Module):
    """LAM + dynamics as one module, so DDP synchronises both with one wrapper; with train_lam=False
    the LAM only labels transitions (frozen) and only dynamics learns."""

    def __init__(self, lam: LatentActionModel, dynamics: DynamicsModel, train_lam: bool = True):
        super().__init__()
        self.lam, self.dynamics, self.train_lam = lam, dynamics, train_lam

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.train_lam:
            out = self.dynamics.loss(tokens, self.lam.infer_actions(frames))
            return {"loss": out.loss, "dynamics_loss": out.loss, "token_accuracy": out.accuracy}
        lam_out = self.lam(frames)
        dynamics_out = self.dynamics.loss(tokens, lam_out.vq.ids.detach())
        return {"loss": lam_out.loss + dynamics_out.loss, "lam_loss": lam_out.loss,
                "dynamics_loss": dynamics_out.loss, "token_accuracy": dynamics_out.accuracy}


class LAMOnly(torch.nn.Module):
    def __init__(self, lam: LatentActionModel):
        super().__init__()
        self.lam = lam

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.lam(frames)
        return {"loss": out.loss, "lam_loss": out.loss}


@dataclass
class DynamicsRun:
    world: WorldModel
    metrics: dict[str, float]


def train_dynamics(dataset: EpisodeDataset, tokenizer: VideoTokenizer, lam_config: LAMConfig,
                   dynamics_config: DynamicsConfig, config: TrainConfig, run_dir: Path,
                   device: str | None = None, progress: bool = True,
                   lam_first: TrainConfig | None = None, make_progress: ProgressFactory = Progress) -> DynamicsRun:
    """Train LAM + dynamics; with lam_first, the LAM trains alone first (checkpoints in run_dir/lam),
    then dynamics trains against it frozen. Every phase resumes from its latest checkpoint."""
    env = setup_distributed(device)
    torch.manual_seed(config.seed)
    tokenizer = tokenizer.to(env.device).eval().requires_grad_(False)
    lam = LatentActionModel(lam_config)
    dynamics = DynamicsModel(dynamics_config_for(tokenizer.config, lam_config, dynamics_config))
    if dynamics.code_vectors is not None:
        dynamics.use_codebook(tokenizer.vq.codes())
    world = WorldModel(tokenizer, lam, dynamics)
    if lam_first is not None:
        _train_phase("lam", LAMOnly(lam), {"lam": lam}, dataset, None, lam_first,
                     RunCheckpoints(Path(run_dir) / "lam", LAM_KIND), {"lam": asdict(lam_config), "training": asdict(lam_first)},
                     env, progress, make_progress)
        lam.eval().requires_grad_(False)
    pair = CoTrained(lam, dynamics, train_lam=lam_first is None)
    named = {"tokenizer": tokenizer, "lam": lam, "dynamics": dynamics}
    metrics = _train_phase("lam+dynamics" if lam_first is None else "dynamics", pair, named, dataset, tokenizer,
                           config, RunCheckpoints(run_dir, WORLD_KIND), world.configs() | {"training": asdict(config)},
                           env, progress, make_progress)
    if config.fsdp and env.world_size > 1:  # every rank gets the whole world, from the final checkpoint
        world = WorldModel.load(run_dir, str(env.device))
    return DynamicsRun(world.eval(), metrics)


def _train_phase(name: str, trained: torch.nn.Module, saved: dict[str, torch.nn.Module], dataset: EpisodeDataset,
                 tokenizer: VideoTokenizer | None, config: TrainConfig, checkpoints: RunCheckpoints,
                 manifest_config: dict, env: Distributed, progress: bool,
                 make_progress: ProgressFactory = Progress) -> dict[str, float]:
    """One resumable training loop over clips: `trained(frames, tokens)` returns its losses."""
    model = wrap_for_training(trained, env, config.fsdp)
    optimizer = make_optimizer([trained], config)
    start = checkpoints.resume(saved, optimizer, env.device)
    if env.world_size > 1:  # each rank its own MaskGIT masks (the same seed would repeat one rank's on all)
        torch.manual_seed(config.seed + start + 7919 * env.rank)
    sampler = ClipSampler(dataset, "train", config.clip_length, seed=config.seed + start,
                          shard=(env.rank, env.world_size))
    bar = make_progress(name, start, config.steps, config.batch_size * config.clip_length, progress and env.is_main)
    lam = getattr(trained, "lam", None)
    metrics: dict[str, float] = {}
    for step in range(start, config.steps):
        frames = sampler.sample(config.batch_size).to(env.device, non_blocking=True)
        with autocast(env, config):
            tokens = tokenizer.encode(frames).flatten(2) if tokenizer is not None else None  # [B, T, S]
            out = model(frames, tokens)
        optimizer_step(out["loss"], optimizer, [trained], step, config)
        metrics = {key: value.item() for key, value in out.items()}
        if lam is not None:
            metrics["actions_used"] = lam.vq.usage_fraction()
        metrics = env.mean(metrics)
        metrics["frames_per_second"] = bar.update(metrics)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpoints.save(saved, optimizer, step + 1, manifest_config, metrics)
    bar.close()
    return metrics
