"""The spatiotemporal (ST) transformer that the tokenizer, latent action model and dynamics share.

Each block is pre-norm spatial attention (within a frame), causal temporal attention (same position,
earlier frames, rotary positions, sliding window) and an MLP. A slot-based temporal KV cache lets many
independent sequences (worlds) append frames at the cost of one frame each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Key positions of empty cache entries: far enough in the past to fall outside every window.
_EMPTY_POSITION = -(2**40)


@dataclass(frozen=True)
class STConfig:
    num_layers: int
    d_model: int
    num_heads: int
    context_frames: int  # a frame attends to itself and the previous context_frames - 1 frames
    mlp_ratio: float = 4.0

    @property
    def is_temporal(self) -> bool:
        """With a one-frame window the blocks have no temporal attention: every frame is processed alone."""
        return self.context_frames > 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def receptive_frames(self) -> int:
        """Frames the newest frame's output (and the cached state) depend on: each layer's temporal
        attention reaches context_frames - 1 frames further back."""
        return max(self.context_frames, self.num_layers * (self.context_frames - 1))


def rotary_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, 1, 1, E/2] of the absolute frame positions [B, T].

    Angles are computed in float64 so that worlds stepped for many thousands of frames keep exact
    relative offsets, which is all attention scores depend on.
    """
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    angles = rearrange(positions.to(torch.float64)[..., None] * freqs, "b t e -> b t 1 1 e")
    return angles.cos().float(), angles.sin().float()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, T, S, H, E] by the tables of rotary_tables."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def temporal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean mask [B, 1, 1, Tq, Tk]: a query frame sees keys at most window-1 frames in its past."""
    offset = query_positions[:, :, None] - key_positions[:, None, :]  # [B, Tq, Tk]
    allowed = (offset >= 0) & (offset < window)
    return rearrange(allowed, "b q k -> b 1 1 q k")


@dataclass
class FramePositions:
    """The frames of one forward pass and what every layer derives from their positions, computed once."""

    positions: torch.Tensor  # [B, T] absolute frame indices
    cos: torch.Tensor  # rotary tables [B, T, 1, 1, E/2]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, 1, T, keys]: over cached past + these frames; None = plain causal


class TemporalKVCache:
    """Keys/values of the most recent frames of many sequences, one slot per sequence.

    Each slot is a ring buffer of `context_frames - 1` frames per layer. Keys are stored already
    rotated at their absolute positions, so buffer order is irrelevant and the ring never needs shifting:
    memory and time per appended frame stay flat however long a world runs.
    """

    def __init__(self, config: STConfig, num_slots: int, tokens_per_frame: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not config.is_temporal:
            raise ValueError("a KV cache needs context_frames >= 2 (a one-frame model keeps no temporal state)")
        self.config = config
        self.capacity = config.context_frames - 1
        shape = (config.num_layers, num_slots, tokens_per_frame, config.num_heads,
                 self.capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.full((num_slots, self.capacity), _EMPTY_POSITION, device=device,
                                    dtype=torch.int64)
        self.next_position = torch.zeros(num_slots, device=device, dtype=torch.int64)

    @property
    def num_slots(self) -> int:
        return self.positions.shape[0]

    def reset(self, slots: torch.Tensor) -> None:
        self.positions[slots] = _EMPTY_POSITION
        self.next_position[slots] = 0

    def view(self, slots: torch.Tensor, commit: bool = False) -> "CacheView":
        return CacheView(self, slots.to(self.positions.device), commit)

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class CacheView:
    """The cache as seen by one forward pass over a batch of slots.

    Gathered keys are kept per layer, so the many MaskGIT passes of one step read the cache once.
    With commit=True the pass also writes its new frames into the slots and advances their positions.
    """

    def __init__(self, cache: TemporalKVCache, slots: torch.Tensor, commit: bool):
        self.cache, self.slots, self.commit = cache, slots, commit
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.past_positions = cache.positions[slots]  # [B, capacity]

    def committing(self) -> "CacheView":
        """A committing view of the same slots that reuses what this one already gathered (the cache has
        not changed in between): the final pass of a step writes the frame without re-reading the cache."""
        view = CacheView(self.cache, self.slots, commit=True)
        view._gathered = self._gathered
        return view

    def query_positions(self, num_new_frames: int) -> torch.Tensor:
        start = self.cache.next_position[self.slots]
        return start[:, None] + torch.arange(num_new_frames, device=start.device)  # [B, Tn]

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._gathered:
            self._gathered[layer] = (self.cache.keys[layer][self.slots], self.cache.values[layer][self.slots])
        return self._gathered[layer]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new frames' keys/values [B, S, H, Tn, E] at their ring index (last `capacity` only)."""
        keep = min(keys.shape[3], self.cache.capacity)
        keys, values, positions = keys[:, :, :, -keep:], values[:, :, :, -keep:], positions[:, -keep:]
        ring = positions % self.cache.capacity  # [B, keep]
        slots = self.slots[:, None].expand_as(ring)
        # Advanced indexing over (slot, ring) moves those two dims to the front: [B, keep, S, H, E].
        self.cache.keys[layer][slots, :, :, ring] = rearrange(keys, "b s h t e -> b t s h e").to(self.cache.keys.dtype)
        self.cache.values[layer][slots, :, :, ring] = rearrange(values, "b s h t e -> b t s h e").to(self.cache.values.dtype)

    def finish(self, positions: torch.Tensor) -> None:
        if not self.commit:
            return
        keep = min(positions.shape[1], self.cache.capacity)
        positions = positions[:, -keep:]
        ring = positions % self.cache.capacity
        self.cache.positions[self.slots[:, None].expand_as(ring), ring] = positions
        self.cache.next_position[self.slots] = positions[:, -1] + 1


class SpatialAttention(nn.Module):
    def __init__(self, config: STConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, S, D]
        batch = x.shape[0]
        # SDPA's fused CPU/GPU kernels want 4-D inputs: fold frames into the batch.
        q, k, v = rearrange(self.qkv(x), "b t s (three h e) -> three (b t) h s e", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(rearrange(out, "(b t) h s e -> b t s (h e)", b=batch))


class TemporalAttention(nn.Module):
    def __init__(self, config: STConfig, layer: int):
        super().__init__()
        self.num_heads, self.window, self.layer = config.num_heads, config.context_frames, layer
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, frames: FramePositions, cache: CacheView | None) -> torch.Tensor:
        # x [B, T, S, D]
        q, k, v = rearrange(self.qkv(x), "b t s (three h e) -> three b t s h e", three=3, h=self.num_heads)
        q, k = rotary(q, frames.cos, frames.sin), rotary(k, frames.cos, frames.sin)
        q, k, v = (rearrange(y, "b t s h e -> b s h t e") for y in (q, k, v))
        if cache is None:
            out = self._attend_clip(q, k, v, frames.mask)
        else:
            out = self._attend_cached(q, k, v, frames.mask, cache)
            if cache.commit:
                cache.write(self.layer, k, v, frames.positions)
        return self.out(rearrange(out, "b s h t e -> b t s (h e)"))

    def write_cache(self, x: torch.Tensor, frames: FramePositions, cache: CacheView) -> None:
        """Only store x's keys/values [B, T, S, D] (no queries, no attention): what a block whose output
        nobody reads still owes the cache."""
        d_model = x.shape[-1]
        k, v = rearrange(F.linear(x, self.qkv.weight[d_model:]), "b t s (two h e) -> two b t s h e",
                         two=2, h=self.num_heads)
        k = rotary(k, frames.cos, frames.sin)
        cache.write(self.layer, *(rearrange(y, "b t s h e -> b s h t e") for y in (k, v)), frames.positions)

    def _attend_clip(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # plain causal on 4-D inputs lets SDPA pick its fused kernels
            batch = q.shape[0]
            q, k, v = (rearrange(y, "b s h t e -> (b s) h t e") for y in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return rearrange(out, "(b s) h t e -> b s h t e", b=batch)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _attend_cached(self, q, k, v, mask: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """Attend over cached past frames and the new ones without concatenating keys/values:
        only the small score tensors are joined, which keeps each MaskGIT pass at one frame's cost."""
        past_keys, past_values = cache.past(self.layer)  # [B, S, H, capacity, E]
        scale = q.shape[-1] ** -0.5
        past_scores = q @ past_keys.to(q.dtype).transpose(-1, -2)  # [B, S, H, T, capacity]
        new_scores = q @ k.transpose(-1, -2)  # [B, S, H, T, T]
        scores = torch.cat([past_scores, new_scores], dim=-1) * scale
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        capacity = past_keys.shape[3]
        # The past's weighted sum as a broadcast product summed over frames, not a matmul: per (position, head)
        # it is a [T, capacity] x [capacity, E] product, which batched matmul runs ~3x slower on a CPU.
        past = (weights[..., :capacity, None] * past_values.to(v.dtype)[:, :, :, None]).sum(-2)
        return past + weights[..., capacity:] @ v


class STBlock(nn.Module):
    def __init__(self, config: STConfig, layer: int):
        super().__init__()
        hidden = int(config.d_model * config.mlp_ratio)
        self.spatial_norm = nn.LayerNorm(config.d_model)
        self.spatial = SpatialAttention(config)
        self.temporal_norm = nn.LayerNorm(config.d_model) if config.is_temporal else None
        self.temporal = TemporalAttention(config, layer) if config.is_temporal else None
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))

    def forward(self, x: torch.Tensor, frames: FramePositions | None, cache: CacheView | None) -> torch.Tensor:
        x = x + self.spatial(self.spatial_norm(x))
        if self.temporal is not None:
            x = x + self.temporal(self.temporal_norm(x), frames, cache)
        return x + self.mlp(self.mlp_norm(x))

    def write_cache(self, x: torch.Tensor, frames: FramePositions, cache: CacheView) -> None:
        """The part of forward that the cache needs (spatial attention, then temporal keys/values)."""
        x = x + self.spatial(self.spatial_norm(x))
        self.temporal.write_cache(self.temporal_norm(x), frames, cache)


class STTransformer(nn.Module):
    """A stack of ST blocks over x [B, T, S, D]; with a cache view, x holds only the new frames."""

    def __init__(self, config: STConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(STBlock(config, layer) for layer in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, cache: CacheView | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x, cache, positions, outputs=True)

    def write_cache(self, x: torch.Tensor, cache: CacheView, positions: torch.Tensor | None = None) -> None:
        """Append frames x [B, T, S, D] to a committing cache without computing outputs: the last block only
        computes its temporal keys/values (~12% of a 4-layer pass saved when a step writes its frame)."""
        if not (self.config.is_temporal and cache.commit):
            raise ValueError("write_cache needs a temporal model and a committing cache view")
        self._run(x, cache, positions, outputs=False)

    def _run(self, x: torch.Tensor, cache: CacheView | None, positions: torch.Tensor | None,
             outputs: bool) -> torch.Tensor | None:
        if not self.config.is_temporal:  # frames are independent: no positions, masks or cache
            for block in self.blocks:
                x = block(x, None, None)
            return self.norm(x)
        batch, frames = x.shape[:2]
        if positions is None:
            positions = (cache.query_positions(frames) if cache is not None
                         else torch.arange(frames, device=x.device).expand(batch, frames))
        frame_positions = self._frame_positions(positions, cache)
        *blocks, last = self.blocks
        for block in blocks:
            x = block(x, frame_positions, cache)
        if not outputs:
            last.write_cache(x, frame_positions, cache)
            cache.finish(positions)
            return None
        x = last(x, frame_positions, cache)
        if cache is not None:
            cache.finish(positions)
        return self.norm(x)

    def _frame_positions(self, positions: torch.Tensor, cache: CacheView | None) -> FramePositions:
        window = self.config.context_frames
        cos, sin = rotary_tables(positions, self.config.head_dim)
        if cache is not None:
            mask = torch.cat([temporal_mask(positions, cache.past_positions, window),
                              temporal_mask(positions, positions, window)], dim=-1)
        else:  # training clips from position 0: plain causal unless the clip outgrows the window
            mask = None if positions.shape[1] <= window else temporal_mask(positions, positions, window)
        return FramePositions(positions, cos, sin, mask)

    def new_cache(self, num_slots: int, tokens_per_frame: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> TemporalKVCache:
        return TemporalKVCache(self.config, num_slots, tokens_per_frame, device, dtype)
