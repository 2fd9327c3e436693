"""Stage 2: co-train the latent action model and the MaskGIT dynamics model on tokenized clips.

The LAM learns actions from pixels; dynamics learns to predict the next frame's tokens given the LAM's
(detached) action codes. The result, with the frozen tokenizer, is a complete playable world.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genie_models.data import ClipSampler, EpisodeDataset
from genie_models.dynamics import DynamicsConfig, DynamicsModel
from genie_models.lam import LAMConfig, LatentActionModel
from genie_models.tokenizer import VideoTokenizer
from genie_models.training.common import (Progress, RunCheckpoints, TrainConfig, autocast, make_optimizer,
                                          optimizer_step, setup_distributed, wrap_for_training)
from genie_models.world_model import WORLD_KIND, WorldModel, dynamics_config_for

DYNAMICS_TRAINING = {
    "tiny": TrainConfig(steps=250, batch_size=6, clip_length=8, learning_rate=1e-3, warmup_steps=25,
                        final_learning_rate=1e-4, checkpoint_every=125),
    "coinrun": TrainConfig(steps=200_000, batch_size=36, clip_length=16, learning_rate=3e-5, warmup_steps=5_000,
                           final_learning_rate=3e-6, checkpoint_every=5_000),
}


class CoTrained(torch.nn.Module):
    """LAM + dynamics as one module, so DDP synchronises both with one wrapper."""

    def __init__(self, lam: LatentActionModel, dynamics: DynamicsModel):
        super().__init__()
        self.lam, self.dynamics = lam, dynamics

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        lam_out = self.lam(frames)
        dynamics_out = self.dynamics.loss(tokens, lam_out.vq.ids.detach())
        return {"loss": lam_out.loss + dynamics_out.loss, "lam_loss": lam_out.loss,
                "dynamics_loss": dynamics_out.loss, "token_accuracy": dynamics_out.accuracy}


@dataclass
class DynamicsRun:
    world: WorldModel
    metrics: dict[str, float]


def train_dynamics(dataset: EpisodeDataset, tokenizer: VideoTokenizer, lam_config: LAMConfig,
                   dynamics_config: DynamicsConfig, config: TrainConfig, run_dir: Path,
                   device: str | None = None, progress: bool = True) -> DynamicsRun:
    env = setup_distributed(device)
    torch.manual_seed(config.seed)
    tokenizer = tokenizer.to(env.device).eval().requires_grad_(False)
    lam = LatentActionModel(lam_config)
    dynamics = DynamicsModel(dynamics_config_for(tokenizer.config, lam_config, dynamics_config))
    pair = CoTrained(lam, dynamics)
    model = wrap_for_training(pair, env)
    optimizer = make_optimizer([pair], config)
    named = {"tokenizer": tokenizer, "lam": lam, "dynamics": dynamics}
    checkpoints = RunCheckpoints(run_dir, WORLD_KIND)
    start = checkpoints.resume(named, optimizer, env.device)
    sampler = ClipSampler(dataset, "train", config.clip_length, seed=config.seed + env.rank + start)
    bar = Progress("lam+dynamics", start, config.steps, config.batch_size * config.clip_length * env.world_size,
                   progress and env.is_main)
    world = WorldModel(tokenizer, lam, dynamics)
    metrics: dict[str, float] = {}
    for step in range(start, config.steps):
        frames = sampler.sample(config.batch_size).to(env.device, non_blocking=True)
        with autocast(env, config):
            tokens = tokenizer.encode(frames).flatten(2)  # [B, T, S]
            out = model(frames, tokens)
        optimizer_step(out["loss"], optimizer, [pair], step, config)
        metrics = {name: value.item() for name, value in out.items()} | {"actions_used": lam.vq.usage_fraction()}
        metrics["frames_per_second"] = bar.update(metrics)
        if env.is_main and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            checkpoints.save(named, optimizer, step + 1, world.configs() | {"training": asdict(config)}, metrics)
    bar.close()
    return DynamicsRun(world.eval(), metrics)
