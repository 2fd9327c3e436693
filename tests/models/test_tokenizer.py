"""The video tokenizer: shapes of encode/decode, and that it can overfit a clip to high PSNR."""

import torch

from genie_models.metrics import psnr
from genie_models.tokenizer import VideoTokenizer


def _clip(config, frames=2):
    # Smooth colour blobs: learnable structure, not noise.
    y, x = torch.meshgrid(torch.linspace(0, 1, config.image_size), torch.linspace(0, 1, config.image_size), indexing="ij")
    channels = [torch.sin(3 * x + t) * 0.5 + 0.5 for t in range(frames)]
    clip = torch.stack([torch.stack([c, y, (c + y) / 2], dim=-1) for c in channels])
    return (clip[None] * 255).round().to(torch.uint8)  # [1, T, H, W, 3]


def test_encode_decode_shapes_and_dtypes(tokenizer_config):
    tokenizer = VideoTokenizer(tokenizer_config).eval()
    frames = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8)
    ids = tokenizer.encode(frames)
    assert ids.shape == (2, 3, 4, 4) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer_config.num_codes
    decoded = tokenizer.decode(ids)
    assert decoded.shape == frames.shape and decoded.dtype == torch.uint8


def test_tokenizer_overfits_a_clip_above_30_db(tokenizer_config):
    tokenizer = VideoTokenizer(tokenizer_config)
    clip = _clip(tokenizer_config)
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=2e-3)
    for _ in range(400):
        loss = tokenizer(clip).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokenizer.eval()
    reconstruction = tokenizer.decode(tokenizer.encode(clip))
    assert float(psnr(reconstruction, clip).mean()) > 30.0
