"""The video tokenizer: an ST-transformer VQ-VAE turning each patch of each frame into one discrete token.

`encode(frames uint8 [B,T,H,W,3]) -> ids [B,T,h,w]`, `decode(ids) -> frames`; `decode_step` decodes the
newest frame of many worlds at once against their temporal KV caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genie_models.patches import patchify, to_uint8, to_unit_range, unpatchify
from genie_models.st_transformer import CacheView, STConfig, STTransformer
from genie_models.vq import VectorQuantizer, VQOutput, sticky_codes


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 64
    patch_size: int = 4
    d_model: int = 512
    num_heads: int = 8
    encoder_layers: int = 8
    decoder_layers: int = 8
    num_codes: int = 1024
    code_dim: int = 32
    context_frames: int = 16
    # Encoding keeps a patch's previous code while it is within this cosine margin of the nearest code,
    # so tokens change where the picture changes, not where quantization flickers (see sticky_codes).
    sticky_margin: float = 0.0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_size**2

    def encoder_config(self) -> STConfig:
        return STConfig(self.encoder_layers, self.d_model, self.num_heads, self.context_frames)

    def decoder_config(self) -> STConfig:
        return STConfig(self.decoder_layers, self.d_model, self.num_heads, self.context_frames)


TOKENIZER_PRESETS = {
    # Per-frame (context_frames=1): a frame's tokens never depend on the frames before it, so a still
    # background keeps its tokens, a prompt is tokenized exactly as training frames were, and decoding a
    # generated frame needs no cache. The temporal tokenizer trained on 2-frame clips gave prompts 3 dB
    # worse than later frames and an unseen temporal context at play time (README, "Why the world works").
    "tiny": TokenizerConfig(d_model=128, num_heads=4, encoder_layers=2, decoder_layers=2,
                            num_codes=512, code_dim=32, context_frames=1, sticky_margin=0.02),
    "coinrun": TokenizerConfig(),  # the paper's CoinRun case study (Appendix F)
}


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # [B, T, H, W, 3] float in [0, 1]
    vq: VQOutput
    loss: torch.Tensor


class VideoTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        patch_dim = config.patch_size**2 * 3
        self.patch_embed = nn.Linear(patch_dim, config.d_model)
        self.encoder_position = nn.Parameter(torch.randn(config.tokens_per_frame, config.d_model) * 0.02)
        self.encoder = STTransformer(config.encoder_config())
        self.to_code = nn.Linear(config.d_model, config.code_dim)
        self.vq = VectorQuantizer(config.num_codes, config.code_dim)
        self.from_code = nn.Linear(config.code_dim, config.d_model)
        self.decoder_position = nn.Parameter(torch.randn(config.tokens_per_frame, config.d_model) * 0.02)
        self.decoder = STTransformer(config.decoder_config())
        self.to_pixels = nn.Linear(config.d_model, patch_dim)

    def _encode_latents(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = to_unit_range(frames) * 2 - 1
        x = self.patch_embed(patchify(pixels, self.config.patch_size)) + self.encoder_position
        return self.to_code(self.encoder(x))  # [B, T, S, code_dim]

    def _decode_codes(self, codes: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        x = self.decoder(self.from_code(codes) + self.decoder_position, cache=cache)
        patches = self.to_pixels(x)
        return unpatchify(patches, self.config.patch_size, self.config.image_size) + 0.5

    def forward(self, frames: torch.Tensor) -> TokenizerOutput:
        """Reconstruct frames [B, T, H, W, 3] (uint8 or float in [0, 1]) through the codebook."""
        vq = self.vq(self._encode_latents(frames))
        reconstruction = self._decode_codes(vq.quantized)
        loss = F.mse_loss(reconstruction, to_unit_range(frames)) + vq.loss
        return TokenizerOutput(reconstruction, vq, loss)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B, T, H, W, 3] -> token ids [B, T, h, w]."""
        similarity = self.vq.similarity(self._encode_latents(frames))  # [B, T, S, num_codes]
        ids = sticky_codes(similarity, self.config.sticky_margin) if self.config.sticky_margin > 0 else similarity.argmax(-1)
        return rearrange(ids, "b t (h w) -> b t h w", h=self.config.grid_size)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T, h, w] -> uint8 frames [B, T, H, W, 3]."""
        codes = self.vq.lookup(rearrange(ids, "b t h w -> b t (h w)"))
        return to_uint8(self._decode_codes(codes))

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """Decode the next frame(s) ids [B, Tn, h, w] of the cached sequences -> uint8 [B, Tn, H, W, 3]."""
        codes = self.vq.lookup(rearrange(ids, "b t h w -> b t (h w)"))
        return to_uint8(self._decode_codes(codes, cache))
