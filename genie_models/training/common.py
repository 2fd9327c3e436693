"""What every training stage shares: the run config, AdamW with warmup + cosine, mixed precision,
DDP under torchrun, progress with throughput, and resumable checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from genie_models.checkpoints import (latest_checkpoint, load_checkpoint, load_optimizer_state,
                                      optimizer_state_to_tensors, prune_checkpoints, save_run_checkpoint)
from genie_models.training.sharding import (clip_gradients, full_tensors, optimizer_references, shard_blocks,
                                            shard_like)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    clip_length: int
    learning_rate: float
    warmup_steps: int
    final_learning_rate: float = 0.0
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9)
    grad_clip: float = 1.0
    mixed_precision: bool = True  # bf16 autocast where the device supports it (CUDA)
    checkpoint_every: int = 500
    seed: int = 0
    # Batch sizes are global: under torchrun each of N ranks trains on its 1/N share of the same draw.
    fsdp: bool = False  # under torchrun: shard the transformer blocks across ranks (FSDP2) instead of DDP


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to final_learning_rate at config.steps."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.final_learning_rate + (config.learning_rate - config.final_learning_rate) * cosine


def make_optimizer(modules: list[nn.Module], config: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms, biases, embeddings' position tables and codebooks (1-D or tiny tensors).
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over ranks: with equal shares of the global batch, the global batch's metrics."""
        if self.world_size == 1:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(metrics, (values / self.world_size).tolist()))


def setup_distributed(device: str | None = None) -> Distributed:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); else run alone.
    A bare "cuda" means this process's GPU (LOCAL_RANK); NCCL for CUDA devices, gloo for CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = f"cuda:{local_rank}" if device == "cuda" else device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Distributed(rank, world_size, torch.device(device))


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process running alone."""
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap_for_training(module: nn.Module, env: Distributed, fsdp: bool = False) -> nn.Module:
    """module on its device in training mode; under torchrun, replicated (DDP) or block-sharded (FSDP)."""
    module.to(env.device).train()
    if env.world_size > 1 and fsdp:
        return shard_blocks(module, env.device)
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    return module


def autocast(env: Distributed, config: TrainConfig):
    if config.mixed_precision and env.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, modules: list[nn.Module],
                   step: int, config: TrainConfig) -> float:
    """Backward, clip, step at the scheduled learning rate; returns the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for module in modules for p in module.parameters() if p.grad is not None]
    if config.fsdp and dist.is_initialized():
        grad_norm = clip_gradients(params, config.grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return float(grad_norm)


class RunCheckpoints:
    """Checkpoints of one training run under `root` (step-N folders + a `latest` pointer).

    Every rank calls save and resume: sharded (FSDP) tensors are gathered whole for saving and sharded again
    on loading, so the files are the same full safetensors whatever the run's ranks; rank 0 alone writes.
    """

    def __init__(self, root: Path, kind: str, keep: int = 2):
        self.root, self.kind, self.keep = Path(root), kind, keep

    def save(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, step: int,
             config: dict, metrics: dict[str, float]) -> Path | None:
        tensors = {name: full_tensors(module.state_dict()) for name, module in modules.items()}
        optimizer_tensors, optimizer_meta = optimizer_state_to_tensors(optimizer)
        tensors["optimizer"] = full_tensors(optimizer_tensors)
        path = None
        if is_main_process():
            path = save_run_checkpoint(self.root, tensors, config, step, metrics=metrics, kind=self.kind,
                                       extra={"optimizer": optimizer_meta})
            prune_checkpoints(self.root, keep=self.keep)
        if dist.is_initialized():
            dist.barrier()  # no rank moves on (or exits) before the checkpoint is complete
        return path

    def resume(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, device: torch.device) -> int:
        """Load the latest checkpoint into modules and optimizer; returns the step to continue from (0 if none)."""
        path = latest_checkpoint(self.root)
        _check_ranks_agree(self.root, int(path.name.split("-")[-1]) if path else 0, device)
        if path is None:
            return 0
        checkpoint = load_checkpoint(path, map_location=device)
        for name, module in modules.items():
            module.load_state_dict(shard_like(checkpoint.tensors(name), module.state_dict()))
        saved = checkpoint.tensors("optimizer")
        load_optimizer_state(optimizer, shard_like(saved, optimizer_references(optimizer, saved)),
                             checkpoint.manifest.extra["optimizer"])
        return checkpoint.manifest.step


def _check_ranks_agree(root: Path, step: int, device: torch.device) -> None:
    """Every rank must resume from the same step: on several nodes, only rank 0's node holds the checkpoints
    unless the run directory is shared storage (or filled from the store first, as the Kubernetes Job does)."""
    if not dist.is_initialized():
        return
    steps = torch.tensor([step, -step], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if int(steps[0]) != -int(steps[1]):
        raise ValueError(f"{root}: the ranks see different latest checkpoints (steps {-int(steps[1])} to "
                         f"{int(steps[0])}); on several nodes, put the run directory on storage every node shares")


class Progress:
    """A tqdm bar showing the stage's losses and frames/second; silent on non-main ranks.
    The training functions take any factory with this constructor's signature (`make_progress`)."""

    def __init__(self, stage: str, start: int, total: int, frames_per_step: int, enabled: bool):
        self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0)
        self.frames_per_step, self.started, self.steps = frames_per_step, time.perf_counter(), 0

    def update(self, metrics: dict[str, float]) -> float:
        self.steps += 1
        frames_per_second = self.steps * self.frames_per_step / (time.perf_counter() - self.started)
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in metrics.items()}, "frames/s": f"{frames_per_second:.0f}"},
                             refresh=False)
        self.bar.update(1)
        return frames_per_second

    def close(self) -> None:
        self.bar.close()


ProgressFactory = Callable[[str, int, int, int, bool], Progress]  # (stage, start step, total, frames/step, enabled)
