"""The latent action model: learns a tiny discrete set of actions from unlabeled video.

The encoder sees frames 1..t+1 and emits one code per transition from a codebook of `num_actions`;
the decoder sees only frames 1..t plus that code and must reconstruct frame t+1, so the code has to
carry what changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genie_models.patches import patchify, to_unit_range, unpatchify
from genie_models.st_transformer import STConfig, STTransformer
from genie_models.vq import VectorQuantizer, VQOutput


@dataclass(frozen=True)
class LAMConfig:
    image_size: int = 64
    patch_size: int = 16
    d_model: int = 512
    num_heads: int = 8
    encoder_layers: int = 8
    decoder_layers: int = 8
    num_actions: int = 8
    latent_dim: int = 32
    context_frames: int = 16
    action_entropy_weight: float = 0.1  # keeps all actions in use early on (see VectorQuantizer)
    # The decoder predicts the change from frame t to t+1 rather than frame t+1 itself: it starts at
    # "copy the last frame" (~33 dB on CoinRun) instead of below it, so the action code is pushed to
    # carry what changed from the first steps (measured: README, "Why the world works").
    predict_residual: bool = True

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def encoder_config(self) -> STConfig:
        return STConfig(self.encoder_layers, self.d_model, self.num_heads, self.context_frames)

    def decoder_config(self) -> STConfig:
        return STConfig(self.decoder_layers, self.d_model, self.num_heads, self.context_frames)


LAM_PRESETS = {
    # A lighter entropy term: at 0.1 the decoder's prediction from the inferred action was no better than
    # from a random one after 1,000 steps (26.7 vs 26.2 dB); at 0.03 it was (27.3 vs 25.5 dB).
    "tiny": LAMConfig(d_model=128, num_heads=4, encoder_layers=2, decoder_layers=2, context_frames=8,
                      action_entropy_weight=0.03),
    "coinrun": LAMConfig(),
}


@dataclass
class LAMOutput:
    prediction: torch.Tensor  # [B, T-1, H, W, 3] predicted frames 2..T in [0, 1]
    vq: VQOutput  # actions: ids [B, T-1]
    loss: torch.Tensor


class LatentActionModel(nn.Module):
    def __init__(self, config: LAMConfig):
        super().__init__()
        self.config = config
        patch_dim = config.patch_size**2 * 3
        self.patch_embed = nn.Linear(patch_dim, config.d_model)
        self.encoder_position = nn.Parameter(torch.randn(config.tokens_per_frame, config.d_model) * 0.02)
        self.encoder = STTransformer(config.encoder_config())
        # The whole frame's features feed the action, so it can say *where* things changed.
        self.to_action = nn.Linear(config.tokens_per_frame * config.d_model, config.latent_dim)
        self.vq = VectorQuantizer(config.num_actions, config.latent_dim, entropy_weight=config.action_entropy_weight)
        self.decoder_patch_embed = nn.Linear(patch_dim, config.d_model)
        self.decoder_position = nn.Parameter(torch.randn(config.tokens_per_frame, config.d_model) * 0.02)
        self.action_embed = nn.Linear(config.latent_dim, config.d_model)
        self.decoder = STTransformer(config.decoder_config())
        self.to_pixels = nn.Linear(config.d_model, patch_dim)
        if config.predict_residual:  # start exactly at "nothing changes"
            nn.init.zeros_(self.to_pixels.weight)
            nn.init.zeros_(self.to_pixels.bias)

    def _action_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, H, W, 3] in [-1, 1] -> one latent per transition [B, T-1, latent_dim]."""
        x = self.patch_embed(patchify(pixels, self.config.patch_size)) + self.encoder_position
        features = self.encoder(x)[:, 1:]  # frame t+1's features, which (causally) saw frames <= t+1
        return self.to_action(rearrange(features, "b t s d -> b t (s d)"))

    def forward(self, frames: torch.Tensor) -> LAMOutput:
        """frames [B, T, H, W, 3] (uint8 or [0, 1] float) -> reconstruction of frames 2..T."""
        target = to_unit_range(frames)
        pixels = target * 2 - 1
        vq = self.vq(self._action_latents(pixels))
        context = self.decoder_patch_embed(patchify(pixels[:, :-1], self.config.patch_size))
        x = context + self.decoder_position + self.action_embed(vq.quantized)[:, :, None, :]
        patches = self.to_pixels(self.decoder(x))
        base = target[:, :-1] if self.config.predict_residual else 0.5
        prediction = unpatchify(patches, self.config.patch_size, self.config.image_size) + base
        loss = F.mse_loss(prediction, target[:, 1:]) + vq.loss
        return LAMOutput(prediction, vq, loss)

    @torch.no_grad()
    def infer_actions(self, frames: torch.Tensor) -> torch.Tensor:
        """Label every transition of frames [B, T, H, W, 3] with an action id -> [B, T-1]."""
        return self.vq.nearest(self._action_latents(to_unit_range(frames) * 2 - 1))

