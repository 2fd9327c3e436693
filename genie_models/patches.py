"""Frame <-> patch conversion and pixel scaling shared by the pixel-level models (tokenizer, LAM)."""

from __future__ import annotations

import torch
from einops import rearrange


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float in [0, 1]; float input is assumed to be in [0, 1] already."""
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    return (frames.clamp(0, 1) * 255.0).round().to(torch.uint8)


def patchify(frames: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, T, H, W, C] -> [B, T, (H/p * W/p), p*p*C]."""
    return rearrange(frames, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, image_size: int) -> torch.Tensor:
    """[B, T, S, p*p*C] -> [B, T, H, W, C]."""
    return rearrange(patches, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c",
                     h=image_size // patch_size, p1=patch_size, p2=patch_size)
