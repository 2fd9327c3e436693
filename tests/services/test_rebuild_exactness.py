"""Is a world's cache rebuilt from its kept history (the receptive field) bit-identical to the one it lost?

The model services rely on it after every restart; these tests use the engines' public methods only.
"""

from __future__ import annotations

import torch

from genie_models.stepping import FrameDecoder
from genie_models.world_model import WorldModel

NUM_WORLDS, NUM_FRAMES = 32, 12


def decoded_next_frames(checkpoint, history_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each world's next frame decoded after playing NUM_FRAMES frames one by one, and after a rebuild from
    the frames history_from.. only, placed at their own positions (first_position: without it the rotary
    tables rounded differently, 1 pixel of 98,304 off by 1) -> (undisturbed, rebuilt) uint8 [N, H, W, 3]."""
    torch.manual_seed(0)
    tokenizer = WorldModel.load(checkpoint).tokenizer
    grid, codes = tokenizer.config.grid_size, tokenizer.config.num_codes
    history = torch.randint(0, codes, (NUM_WORLDS, NUM_FRAMES, grid, grid))
    upcoming = torch.randint(0, codes, (NUM_WORLDS, grid, grid))
    played, rebuilt = FrameDecoder(tokenizer, NUM_WORLDS, "cpu"), FrameDecoder(tokenizer, NUM_WORLDS, "cpu")
    worlds = list(range(NUM_WORLDS))
    for world in worlds:
        played.start(world, history[world, :1])
        rebuilt.start(world, history[world, history_from:], first_position=history_from)
    for frame in range(1, NUM_FRAMES):
        played.decode(worlds, history[:, frame])
    return played.decode(worlds, upcoming), rebuilt.decode(worlds, upcoming)


def test_rebuild_from_the_whole_history_decodes_like_the_undisturbed_world(world_checkpoint):
    undisturbed, rebuilt = decoded_next_frames(world_checkpoint, history_from=0)
    assert torch.equal(undisturbed, rebuilt)


def test_rebuild_from_the_kept_window_decodes_like_the_undisturbed_world(world_checkpoint):
    kept = WorldModel.load(world_checkpoint).history_frames()
    assert kept < NUM_FRAMES
    undisturbed, rebuilt = decoded_next_frames(world_checkpoint, history_from=NUM_FRAMES - kept)
    assert torch.equal(undisturbed, rebuilt)
