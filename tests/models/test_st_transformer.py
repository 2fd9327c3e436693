"""The ST-transformer: causality, sliding window, and KV-cached stepping equal to full recomputation."""

import pytest
import torch

from genie_models.st_transformer import STConfig, STTransformer


@pytest.fixture
def transformer() -> STTransformer:
    return STTransformer(STConfig(num_layers=2, d_model=32, num_heads=4, context_frames=4)).eval()


def test_changing_a_later_frame_leaves_earlier_outputs_unchanged(transformer):
    x = torch.randn(2, 6, 5, 32)
    changed = x.clone()
    changed[:, 3] = torch.randn(2, 5, 32)
    out, out_changed = transformer(x), transformer(changed)
    torch.testing.assert_close(out[:, :3], out_changed[:, :3])
    assert not torch.allclose(out[:, 3:], out_changed[:, 3:])


def test_frames_beyond_the_window_have_no_influence(transformer):
    # context_frames=4: frame 6 sees frames 3..6 only in layer 1; with 2 layers, frames 0..1 can still
    # reach it only through frames 2.., so changing frame 0 must leave frame 7 (7-0 > 2*(4-1)) unchanged.
    x = torch.randn(1, 8, 5, 32)
    changed = x.clone()
    changed[:, 0] = torch.randn(5, 32)
    torch.testing.assert_close(transformer(x)[:, 7], transformer(changed)[:, 7])


def test_cached_stepping_equals_full_recomputation_past_the_window(transformer):
    x = torch.randn(3, 9, 5, 32)
    full = transformer(x)
    cache = transformer.new_cache(num_slots=4, tokens_per_frame=5)
    slots = torch.tensor([2, 0, 3])
    stepped = [transformer(x[:, t:t + 1], cache=cache.view(slots, commit=True)) for t in range(9)]
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, atol=1e-5, rtol=1e-4)


def test_writing_frames_without_outputs_fills_the_cache_as_a_full_pass_does(transformer):
    x = torch.randn(2, 6, 5, 32)
    full, written = (transformer.new_cache(num_slots=2, tokens_per_frame=5) for _ in range(2))
    slots = torch.tensor([1, 0])
    for t in range(6):  # one frame at a time (a step), then past the ring's capacity
        transformer(x[:, t:t + 1], cache=full.view(slots, commit=True))
        transformer.write_cache(x[:, t:t + 1], written.view(slots, commit=True))
    torch.testing.assert_close(written.keys, full.keys)
    torch.testing.assert_close(written.values, full.values)
    assert torch.equal(written.positions, full.positions) and torch.equal(written.next_position, full.next_position)
    with pytest.raises(ValueError, match="committing"):
        transformer.write_cache(x[:, :1], written.view(slots))


def test_a_non_committing_pass_leaves_the_cache_unchanged(transformer):
    x = torch.randn(1, 3, 5, 32)
    cache = transformer.new_cache(num_slots=1, tokens_per_frame=5)
    slots = torch.tensor([0])
    transformer(x[:, :2], cache=cache.view(slots, commit=True))
    keys, positions = cache.keys.clone(), cache.positions.clone()
    first = transformer(x[:, 2:], cache=cache.view(slots))
    second = transformer(x[:, 2:], cache=cache.view(slots))
    assert torch.equal(cache.keys, keys) and torch.equal(cache.positions, positions)
    torch.testing.assert_close(first, second)


def test_slots_are_independent(transformer):
    a, b = torch.randn(1, 3, 5, 32), torch.randn(1, 3, 5, 32)
    cache = transformer.new_cache(num_slots=2, tokens_per_frame=5)
    transformer(a, cache=cache.view(torch.tensor([0]), commit=True))
    alone = transformer(a[:, -1:], cache=cache.view(torch.tensor([0])))
    transformer(b, cache=cache.view(torch.tensor([1]), commit=True))
    after_other = transformer(a[:, -1:], cache=cache.view(torch.tensor([0])))
    torch.testing.assert_close(alone, after_other)


def test_cache_memory_is_flat_over_thousands_of_steps(transformer):
    cache = transformer.new_cache(num_slots=1, tokens_per_frame=5)
    size = cache.nbytes()
    slots = torch.tensor([0])
    frame = torch.randn(1, 1, 5, 32)
    for _ in range(2000):
        out = transformer(frame, cache=cache.view(slots, commit=True))
    assert cache.nbytes() == size
    assert int(cache.next_position[0]) == 2000
    assert torch.isfinite(out).all()


def test_a_one_frame_window_processes_every_frame_alone():
    per_frame = STTransformer(STConfig(num_layers=2, d_model=32, num_heads=4, context_frames=1)).eval()
    assert all(block.temporal is None for block in per_frame.blocks)
    x = torch.randn(2, 3, 5, 32)
    changed = x.clone()
    changed[:, 0] = torch.randn(2, 5, 32)
    out, out_changed = per_frame(x), per_frame(changed)
    torch.testing.assert_close(out[:, 1:], out_changed[:, 1:])  # other frames never see frame 0
    torch.testing.assert_close(out[:, 2:], per_frame(x[:, 2:]))
    with pytest.raises(ValueError, match="context_frames >= 2"):
        per_frame.new_cache(num_slots=1, tokens_per_frame=5)
