"""Vector quantization with a straight-through estimator, shared by the tokenizer and the LAM.

Codes and inputs are L2-normalized (cosine-similarity lookup), which keeps codebook usage high; codes
that go unused are re-initialised from recent encoder outputs so the codebook never collapses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class VQOutput:
    quantized: torch.Tensor  # [..., code_dim], carries straight-through gradients to the encoder
    ids: torch.Tensor  # [...] int64
    loss: torch.Tensor  # codebook + commitment loss (scalar)


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, code_dim: int, commitment: float = 0.25,
                 dead_code_threshold: float = 0.03, restart_every: int = 20, entropy_weight: float = 0.0,
                 entropy_temperature: float = 0.1):
        super().__init__()
        self.num_codes, self.commitment = num_codes, commitment
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.dead_code_threshold, self.restart_every = dead_code_threshold, restart_every
        self.codebook = nn.Parameter(F.normalize(torch.randn(num_codes, code_dim), dim=-1))
        # Assignments counted over the current window of `restart_every` training calls, and each code's
        # share in the last complete window (what usage reports). Buffers, so checkpoints keep them.
        self.register_buffer("window_counts", torch.zeros(num_codes))
        self.register_buffer("usage", torch.full((num_codes,), 1.0 / num_codes))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes()[ids]

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each latent to every code: z [..., D] -> [..., num_codes]."""
        return F.normalize(z.float(), dim=-1) @ self.codes().t()

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        return self.similarity(z).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> VQOutput:
        z = F.normalize(z.float(), dim=-1)
        codes = self.codes()
        similarity = z @ codes.t()
        ids = similarity.argmax(dim=-1)
        quantized = codes[ids]
        loss = F.mse_loss(quantized, z.detach()) + self.commitment * F.mse_loss(z, quantized.detach())
        if self.training and self.entropy_weight > 0:
            loss = loss + self.entropy_weight * self._entropy_penalty(similarity)
        if self.training:
            self._track_usage(ids, z)
        return VQOutput(quantized=z + (quantized - z).detach(), ids=ids, loss=loss)

    def _entropy_penalty(self, similarity: torch.Tensor) -> torch.Tensor:
        """Confident per-input assignments but a spread over the batch: keeps a tiny codebook (the LAM's
        actions) from collapsing onto one code while the decoder is still learning to use it."""
        p = (similarity / self.entropy_temperature).softmax(dim=-1).reshape(-1, self.num_codes)
        per_input = -(p * p.clamp_min(1e-9).log()).sum(-1).mean()
        mean = p.mean(0)
        return per_input + (mean * mean.clamp_min(1e-9).log()).sum()

    def usage_fraction(self) -> float:
        """Share of codes that were not dead in the last window."""
        return float((self.usage >= self.dead_code_threshold / self.num_codes).float().mean())

    def perplexity(self) -> float:
        p = self.usage / self.usage.sum()
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))

    @torch.no_grad()
    def _track_usage(self, ids: torch.Tensor, z: torch.Tensor) -> None:
        counts = torch.bincount(ids.flatten(), minlength=self.num_codes).float()
        if _distributed():
            dist.all_reduce(counts)  # global counts: every rank (and a checkpoint) sees what one process would
        self.window_counts += counts
        self.calls += 1
        if int(self.calls) % self.restart_every != 0:
            return
        self.usage.copy_(self.window_counts / self.window_counts.sum())
        self.window_counts.zero_()
        self._restart_dead_codes(z.reshape(-1, z.shape[-1]))

    @torch.no_grad()
    def _restart_dead_codes(self, samples: torch.Tensor) -> None:
        """Move codes that (almost) nobody chose onto recent encoder outputs, where the data is.

        Under data parallelism the picks index the global batch (ranks hold equal, contiguous shares of it,
        in rank order) with rank 0's random numbers, so N ranks restart exactly the codes one process would.
        """
        dead = (self.usage < self.dead_code_threshold / self.num_codes).nonzero().flatten()
        if dead.numel() == 0:
            return
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
        local = samples.shape[0]
        picks = torch.randint(0, local * world_size, (dead.numel(),), device=samples.device)
        noise = 0.01 * torch.randn(dead.numel(), samples.shape[1], device=samples.device, dtype=samples.dtype)
        replacements = torch.zeros_like(noise)
        if world_size > 1:
            dist.broadcast(picks, src=0)
            dist.broadcast(noise, src=0)
        mine = picks // local == rank
        replacements[mine] = samples[picks[mine] % local]
        if world_size > 1:
            dist.all_reduce(replacements)  # each pick comes from the one rank that holds it
        self.codebook.data[dead] = F.normalize(replacements + noise, dim=-1).to(self.codebook.dtype)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sticky_codes(similarity: torch.Tensor, margin: float) -> torch.Tensor:
    """Nearest codes of a sequence of frames, keeping a position's previous code while it stays within
    `margin` (cosine similarity) of the nearest one. similarity [B, T, S, V] -> ids [B, T, S].

    Nearly identical patches in consecutive frames often fall on different, nearly identical codes: on
    CoinRun 45% of tokens changed per frame although the frames themselves differ by ~35 dB. That churn
    is noise no dynamics model can predict; a margin of 0.02 cuts it to 13% for 0.15 dB of reconstruction.
    """
    ids = similarity.argmax(dim=-1)
    for t in range(1, ids.shape[1]):
        previous = ids[:, t - 1]
        previous_similarity = similarity[:, t].gather(-1, previous[..., None])[..., 0]
        keep = previous_similarity >= similarity[:, t].max(dim=-1).values - margin
        ids[:, t] = torch.where(keep, previous, ids[:, t])
    return ids
