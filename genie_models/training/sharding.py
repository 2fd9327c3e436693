"""FSDP for the big presets: every ST-transformer block's parameters are sharded across ranks (FSDP2's
`fully_shard`), the small rest (embeddings, heads, VQ codebooks) stays replicated with averaged gradients,
and checkpoints gather full tensors, so a sharded run writes the same safetensors a single process does.

Why blocks only: the blocks hold nearly all parameters; a VQ codebook is rewritten during the forward pass
(dead-code restarts), which a sharded parameter would silently drop; and methods other than `forward`
(`tokenizer.encode`, `lam.infer_actions`, `dynamics.loss`) work unchanged because each block gathers its own
parameters when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from genie_models.st_transformer import STBlock


def shard_blocks(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard module's ST blocks in place over all ranks (blocks sharded by an earlier phase stay as they are)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the run's device, even on a GPU machine
    for block in [m for m in module.modules() if isinstance(m, STBlock) and not isinstance(m, FSDPModule)]:
        fully_shard(block, mesh=mesh)
    for param in module.parameters():
        if param.requires_grad and not isinstance(param, DTensor) and not getattr(param, "_replicated", False):
            param.register_post_accumulate_grad_hook(_average_gradient)
            param._replicated = True  # one hook, however many phases train this parameter
    return module


def _average_gradient(param: torch.Tensor) -> None:
    # Autograd runs the hooks in the same order on every rank, so the collectives line up.
    dist.all_reduce(param.grad)  # SUM: gloo has no AVG
    param.grad.div_(dist.get_world_size())


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors gathered whole (a collective: every rank calls it, in the same order)."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().contiguous()
            for name, value in tensors.items()}


def shard_like(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors from a checkpoint, sharded like the reference tensor of the same name (a collective)."""
    return {name: distribute_tensor(value, reference[name].device_mesh, reference[name].placements)
            if isinstance(reference.get(name), DTensor) else value for name, value in tensors.items()}


def optimizer_references(optimizer: torch.optim.Optimizer,
                         tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each `state.<param index>.<name>` tensor of a saved optimizer: the parameter it is shaped like."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    references = {}
    for name, value in tensors.items():
        section, index, _ = name.split(".", 2)
        if section == "state" and value.shape == params[int(index)].shape and value.dim() > 0:
            references[name] = params[int(index)]
    return references


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for a mix of sharded (DTensor) and replicated gradients; returns the global norm."""
    squares = [p.grad.float().pow(2).sum() for p in params]
    total = torch.stack([s.full_tensor() if isinstance(s, DTensor) else s for s in squares]).sum().sqrt()
    scale = min(1.0, max_norm / (float(total) + 1e-6))  # a Python number: DTensors take it as they are
    for p in params:
        p.grad.mul_(scale)
    return total
