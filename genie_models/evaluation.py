"""Evaluate a trained world on held-out clips: reconstruction and generation PSNR/SSIM, the paper's
controllability metric ΔtPSNR, and how well latent actions agree with the hidden true actions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from genie_models.data import EpisodeDataset, iterate_heldout
from genie_models.metrics import contingency, delta_t_psnr, normalized_mutual_information, psnr, ssim
from genie_models.world import rollout_actions
from genie_models.world_model import WorldModel


@dataclass(frozen=True)
class EvalConfig:
    num_clips: int = 48
    horizon: int = 4  # ΔtPSNR's t: frames generated after the single prompt frame
    batch_size: int = 16
    seed: int = 0


@torch.no_grad()
def reconstruction_metrics(world: WorldModel, clips: torch.Tensor) -> dict[str, float]:
    """Tokenizer round trip of clips uint8 [B, T, H, W, 3]."""
    decoded = world.tokenizer.decode(world.tokenizer.encode(clips))
    return {"reconstruction_psnr": float(psnr(decoded, clips).mean()),
            "reconstruction_ssim": float(ssim(decoded, clips).mean())}


@torch.no_grad()
def evaluate_world(world: WorldModel, dataset: EpisodeDataset, config: EvalConfig = EvalConfig()) -> dict[str, float]:
    world.eval()
    generator = torch.Generator().manual_seed(config.seed)
    sums: dict[str, float] = {}
    latent, true, deltas = [], [], []
    count = 0
    for batch in iterate_heldout(dataset, config.horizon + 1, config.num_clips, config.batch_size,
                                 with_actions=dataset.episodes[0].actions_shard is not None):
        clips, size = batch.frames, batch.frames.shape[0]
        inferred = world.lam.infer_actions(clips)  # [B, horizon]
        random = torch.randint(0, world.num_actions, inferred.shape, generator=generator)
        prompts = clips[:, 0].numpy()
        from_inferred = torch.from_numpy(rollout_actions(world, prompts, inferred, config.seed))
        from_random = torch.from_numpy(rollout_actions(world, prompts, random, config.seed))
        target, generated = clips[:, -1], from_inferred[:, -1]
        batch_metrics = reconstruction_metrics(world, clips) | {
            "generation_psnr": float(psnr(from_inferred, clips[:, 1:]).mean()),
            "generation_ssim": float(ssim(from_inferred, clips[:, 1:]).mean()),
            "delta_t_psnr": delta_t_psnr(target, generated, from_random[:, -1]),
        }
        deltas.append(psnr(target, generated) - psnr(target, from_random[:, -1]))
        for name, value in batch_metrics.items():
            sums[name] = sums.get(name, 0.0) + value * size
        count += size
        if batch.actions is not None:
            latent.append(inferred.flatten())
            true.append(batch.actions.flatten())
    per_clip = torch.cat(deltas)
    metrics = {name: total / count for name, total in sums.items()} | {
        "num_clips": float(count),
        # Standard error of ΔtPSNR over clips, to tell a real controllability gap from noise.
        "delta_t_psnr_stderr": float(per_clip.std() / per_clip.numel() ** 0.5) if count > 1 else 0.0}
    if latent:
        metrics |= action_agreement(torch.cat(latent), torch.cat(true), world.num_actions)
    return metrics


def action_agreement(latent: torch.Tensor, true: torch.Tensor, num_actions: int) -> dict[str, float]:
    """How much the latent actions tell about the true (hidden) CoinRun actions."""
    table = contingency(latent, true, num_actions, int(true.max()) + 1)
    return {"action_nmi": normalized_mutual_information(latent, true),
            "latent_actions_used": float((table.sum(dim=1) > 0).sum())}


def write_metrics(metrics: dict[str, float], path: Path) -> str:
    """Write metrics as JSON and return them as a printable two-column table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    width = max(len(name) for name in metrics)
    return "\n".join(f"{name:<{width}}  {value:>10.4f}" for name, value in sorted(metrics.items()))
