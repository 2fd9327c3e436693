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
    # The encoder embeds each transition's two frames together (frame t+1's patch and its change from
    # frame t), so the change is visible to the first linear layer instead of only after temporal
    # attention has learned to compare frames.
    pair_input: bool = False
    # With predict_residual: the decoder's base is frame t shifted by up to (rows, columns) pixels, a
    # mixture over shifts weighted from the action alone, so an action that says how the view scrolled
    # lowers the loss at once (camera motion is most of what changes between frames; README).
    shift_range: tuple[int, int] = (0, 0)
    # Weight of the pixel loss against the action codebook's terms. Pixel MSE on [0, 1] frames is ~1e-3
    # while the codebook and entropy terms on unit vectors are ~1e-2..1e-1: at weight 1 they set the
    # encoder's gradients and the actions ignore the frames (README).
    reconstruction_weight: float = 1.0

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def encoder_config(self) -> STConfig:
        return STConfig(self.encoder_layers, self.d_model, self.num_heads, self.context_frames)

    def decoder_config(self) -> STConfig:
        return STConfig(self.decoder_layers, self.d_model, self.num_heads, self.context_frames)


LAM_PRESETS = {
    # Each action is read from one transition alone (context_frames=1, both frames embedded together)
    # and decoded onto frame t shifted as the action says, with the pixel loss weighted above the codebook
    # terms. Held-out, 1,000 steps: the decoder's next frame from the inferred action 27.6 dB vs 23.1 dB
    # from a random one (copying frame t: 24.8 dB), and the actions sort transitions by how far the view
    # scrolled (NMI 0.59 with the measured vertical shift; 0.12 before). README, "Is it a world yet?".
    "tiny": LAMConfig(d_model=128, num_heads=4, encoder_layers=2, decoder_layers=2, context_frames=1,
                      action_entropy_weight=0.03, pair_input=True, shift_range=(8, 3), reconstruction_weight=100.0),
    # The paper's sizes; only the loss balance departs from it (the imbalance does not depend on size).
    "coinrun": LAMConfig(reconstruction_weight=100.0),
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
        self.patch_embed = nn.Linear(patch_dim * (2 if config.pair_input else 1), config.d_model)
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
        rows, columns = config.shift_range
        self.shift_rows = nn.Linear(config.latent_dim, 2 * rows + 1) if rows else None
        self.shift_columns = nn.Linear(config.latent_dim, 2 * columns + 1) if columns else None
        for head in (self.shift_rows, self.shift_columns):
            if head is not None:  # starts mostly at "no shift"
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
                with torch.no_grad():
                    head.bias[head.out_features // 2] = 4.0
        if config.predict_residual:  # start exactly at "nothing changes"
            nn.init.zeros_(self.to_pixels.weight)
            nn.init.zeros_(self.to_pixels.bias)

    def _action_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, H, W, 3] in [-1, 1] -> one latent per transition [B, T-1, latent_dim]."""
        patches = patchify(pixels, self.config.patch_size)  # [B, T, S, P]
        if self.config.pair_input:
            transitions = torch.cat([patches[:, 1:], patches[:, 1:] - patches[:, :-1]], dim=-1)  # [B, T-1, S, 2P]
            features = self.encoder(self.patch_embed(transitions) + self.encoder_position)
        else:  # frame t+1's features, which (causally) saw frames <= t+1
            features = self.encoder(self.patch_embed(patches) + self.encoder_position)[:, 1:]
        return self.to_action(rearrange(features, "b t s d -> b t (s d)"))

    def forward(self, frames: torch.Tensor) -> LAMOutput:
        """frames [B, T, H, W, 3] (uint8 or [0, 1] float) -> reconstruction of frames 2..T."""
        target = to_unit_range(frames)
        pixels = target * 2 - 1
        vq = self.vq(self._action_latents(pixels))
        context = self.decoder_patch_embed(patchify(pixels[:, :-1], self.config.patch_size))
        x = context + self.decoder_position + self.action_embed(vq.quantized)[:, :, None, :]
        patches = self.to_pixels(self.decoder(x))
        base = self._shifted(target[:, :-1], vq.quantized) if self.config.predict_residual else 0.5
        prediction = unpatchify(patches, self.config.patch_size, self.config.image_size) + base
        loss = self.config.reconstruction_weight * F.mse_loss(prediction, target[:, 1:]) + vq.loss
        return LAMOutput(prediction, vq, loss)

    def _shifted(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """frames [B, T, H, W, 3] -> the mixture over shifts (weights from actions [B, T, latent_dim])."""
        for head, dim in ((self.shift_rows, 2), (self.shift_columns, 3)):
            if head is None:
                continue
            weights = head(actions).softmax(dim=-1)  # [B, T, shifts]
            reach = head.out_features // 2
            frames = sum(weights[:, :, i, None, None, None] * frames.roll(i - reach, dims=dim)
                         for i in range(head.out_features))
        return frames

    @torch.no_grad()
    def infer_actions(self, frames: torch.Tensor) -> torch.Tensor:
        """Label every transition of frames [B, T, H, W, 3] with an action id -> [B, T-1]."""
        return self.vq.nearest(self._action_latents(to_unit_range(frames) * 2 - 1))

