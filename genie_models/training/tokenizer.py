"""Stage 1: train the video tokenizer (VQ-VAE) on clips, reporting reconstruction PSNR and codebook use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genie_models.data import ClipSampler, EpisodeDataset
from genie_models.checkpoints import CheckpointError, load_checkpoint
from genie_models.metrics import psnr
from genie_models.patches import to_unit_range
from genie_models.tokenizer import TokenizerConfig, VideoTokenizer
from genie_models.world_model import config_from_dict, resolve_checkpoint
from genie_models.training.common import (Progress, ProgressFactory, RunCheckpoints, TrainConfig, autocast,
                                          make_optimizer, optimizer_step, setup_distributed, wrap_for_training)

TOKENIZER_KIND = "genie-tokenizer"

TOKENIZER_TRAINING = {
    "tiny": TrainConfig(steps=800, batch_size=16, clip_length=1, learning_rate=1e-3, warmup_steps=50,
                        final_learning_rate=1e-4, checkpoint_every=400),
    "coinrun": TrainConfig(steps=300_000, batch_size=48, clip_length=16, learning_rate=3e-4, warmup_steps=10_000,
                           checkpoint_every=5_000, fsdp=True),
}


@dataclass
class TokenizerRun:
    tokenizer: VideoTokenizer
    metrics: dict[str, float]


def train_tokenizer(dataset: EpisodeDataset, model_config: TokenizerConfig, config: TrainConfig,
                    run_dir: Path, device: str | None = None, progress: bool = True,
                    make_progress: ProgressFactory = Progress) -> TokenizerRun:
    env = setup_distributed(device)
    torch.manual_seed(config.seed)
    tokenizer = VideoTokenizer(model_config)
    model = wrap_for_training(tokenizer, env, config.fsdp)
    optimizer = make_optimizer([tokenizer], config)
    checkpoints = RunCheckpoints(run_dir, TOKENIZER_KIND)
    start = checkpoints.resume({"tokenizer": tokenizer}, optimizer, env.device)
    sampler = ClipSampler(dataset, "train", config.clip_length, seed=config.seed + start,
                          shard=(env.rank, env.world_size))
    bar = make_progress("tokenizer", start, config.steps, config.batch_size * config.clip_length,
                        progress and env.is_main)
    metrics: dict[str, float] = {}
    for step in range(start, config.steps):
        frames = sampler.sample(config.batch_size).to(env.device, non_blocking=True)
        with autocast(env, config):
            out = model(frames)
        optimizer_step(out.loss, optimizer, [tokenizer], step, config)
        metrics = {"loss": out.loss.item(),
                   "psnr": float(psnr(out.reconstruction.detach().float().clamp(0, 1), to_unit_range(frames)).mean()),
                   "codes_used": tokenizer.vq.usage_fraction()}
        metrics = env.mean(metrics)
        metrics["frames_per_second"] = bar.update(metrics)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpoints.save({"tokenizer": tokenizer}, optimizer, step + 1,
                             {"tokenizer": asdict(model_config), "training": asdict(config)}, metrics)
    bar.close()
    if config.fsdp and env.world_size > 1:  # every rank gets the whole model, from the final checkpoint
        tokenizer = load_tokenizer(run_dir, str(env.device))
    return TokenizerRun(tokenizer.eval(), metrics)


def load_tokenizer(path: Path, device: str = "cpu") -> VideoTokenizer:
    """A trained tokenizer from a tokenizer checkpoint or run directory (or from a world checkpoint)."""
    checkpoint = load_checkpoint(resolve_checkpoint(path), map_location=device)
    if "tokenizer" not in checkpoint.manifest.config:
        raise CheckpointError(f"{path} holds no tokenizer (kind {checkpoint.manifest.kind!r})")
    tokenizer = VideoTokenizer(config_from_dict(TokenizerConfig, checkpoint.manifest.config["tokenizer"]))
    tokenizer.load_state_dict(checkpoint.tensors("tokenizer"))
    return tokenizer.eval()
