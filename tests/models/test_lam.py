"""The latent action model: one action per transition, and actions that carry what changed."""

import torch

from genie_models.lam import LatentActionModel


def _moving_square(direction: int, frames: int = 3, size: int = 16) -> torch.Tensor:
    clip = torch.zeros(frames, size, size, 3, dtype=torch.uint8)
    for t in range(frames):
        x = 6 + direction * 2 * t
        clip[t, 6:10, x:x + 4] = 255
    return clip


def _fit(lam: LatentActionModel, clips: torch.Tensor, steps: int) -> LatentActionModel:
    optimizer = torch.optim.AdamW(lam.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = lam(clips).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lam.eval()


def test_infer_actions_labels_every_transition(lam_config):
    lam = LatentActionModel(lam_config).eval()
    actions = lam.infer_actions(torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8))
    assert actions.shape == (2, 3)
    assert int(actions.max()) < lam_config.num_actions


def test_lam_learns_distinct_actions_for_distinct_motions(lam_config):
    clips = torch.stack([_moving_square(-1), _moving_square(1)])  # left, right
    lam = _fit(LatentActionModel(lam_config), clips, 300)
    actions = lam.infer_actions(clips)
    # Both clips start from the same frame: only the action can tell the decoder which way it moved.
    assert actions[0, 0] != actions[1, 0]
    # Copying the previous frame scores 0.0625 here; only a model using the action gets far below.
    assert lam(clips).loss.item() < 0.03


def test_an_untrained_lam_predicts_that_nothing_changes(lam_config):
    lam = LatentActionModel(lam_config).eval()
    clip = torch.randint(0, 256, (1, 3, 16, 16, 3), dtype=torch.uint8)
    prediction = lam(clip).prediction  # frames 2..3, predicted from frames 1..2 and the actions
    torch.testing.assert_close(prediction, clip[:, :-1].float() / 255)


def _scrolling_clip(direction: int, frames: int = 3, size: int = 16) -> torch.Tensor:
    """A textured view scrolling `direction` rows per frame, as CoinRun's camera follows a jump."""
    texture = torch.Generator().manual_seed(3)
    scene = torch.randint(0, 256, (size * 2, size, 3), dtype=torch.uint8, generator=texture)
    return torch.stack([scene[8 + direction * t:8 + direction * t + size] for t in range(frames)])


def test_the_pair_input_lam_with_a_shift_base_learns_which_way_the_view_scrolls(lam_config):
    from dataclasses import replace
    config = replace(lam_config, context_frames=1, pair_input=True, shift_range=(2, 0), reconstruction_weight=100.0)
    clips = torch.stack([_scrolling_clip(-2), _scrolling_clip(2)])
    copy_error = torch.nn.functional.mse_loss(clips[:, :-1].float(), clips[:, 1:].float()).item() / 255**2
    lam = _fit(LatentActionModel(config), clips, 150)
    actions = lam.infer_actions(clips)
    assert actions[0, 0] != actions[1, 0]
    prediction = lam(clips).prediction
    error = torch.nn.functional.mse_loss(prediction, clips[:, 1:].float() / 255).item()
    assert error < copy_error / 4  # the action says which way: far better than "nothing moved"


def test_the_shift_base_starts_at_the_unshifted_frame_and_can_scroll_it(lam_config):
    from dataclasses import replace
    lam = LatentActionModel(replace(lam_config, shift_range=(2, 0))).eval()
    frames = torch.rand(1, 2, 16, 16, 3)
    action = torch.zeros(1, 2, lam_config.latent_dim)
    weights = lam.shift_rows(action).softmax(-1)
    assert weights[0, 0].argmax() == 2  # index 2 of shifts -2..2: no shift
    with torch.no_grad():
        lam.shift_rows.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0]))  # all weight on +1 row
    torch.testing.assert_close(lam._shifted(frames, action), frames.roll(1, dims=2))
